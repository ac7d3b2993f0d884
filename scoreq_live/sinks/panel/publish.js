/*
 * scoreq-live browser panel: publish this browser's microphone, or a file it
 * plays, to the monitor as a stream of its own (WebRTC, WHIP: RFC 9725).
 *
 *  - The offer is sent once ICE gathering has completed (or after
 *    GATHER_TIMEOUT_MS with what was gathered by then): the monitor does not
 *    take trickled candidates (no PATCH).
 *  - POST "whip?stream=NAME" (next to this page, like the feed) with the SDP
 *    offer; 201 brings the answer and the session's Location, which Stop
 *    DELETEs.  The page's ?token= goes along as "Authorization: Bearer".
 *  - The microphone is captured with echo cancellation, noise suppression and
 *    automatic gain control off: each changes the audio that is measured.
 *  - The controls stay hidden when the monitor takes no publishers (OPTIONS
 *    on "whip" is not answered with 2xx) or the browser cannot publish.
 *
 * The stream then comes back through the ordinary feed like any other; its
 * card is marked (data-mine) and scrolled into view.  Errors are shown in
 * the publish bar.  Plain JavaScript, no build step, nothing from elsewhere.
 */
(function () {
  "use strict";

  const GATHER_TIMEOUT_MS = 2000;   // non-trickle: send what was gathered by then
  const CONNECT_TIMEOUT_MS = 15000; // ICE + DTLS after the answer
  const TRACK_TIMEOUT_MS = 3000;    // a playing file's captured stream gets its audio track
  const LOST_AFTER_MS = 6000;       // "disconnected" this long: the monitor has ended the session by now
  const NAME_RE = /^[A-Za-z0-9_.:-]{1,64}$/; // what the monitor takes as a stream name

  const $ = (id) => document.getElementById(id);
  const ui = {
    bar: $("publish"),
    name: $("publish-name"),
    mic: $("publish-mic"),
    file: $("publish-file"),
    fileLabel: $("publish-file-label"),
    stop: $("publish-stop"),
    state: $("publish-state"),
    note: $("publish-note"),
    audio: $("publish-audio"),
    grid: $("grid"),
  };
  if (!ui.bar) return;

  const token = new URLSearchParams(window.location.search).get("token");

  /** "whip" next to this page, so that the panel also works behind a path prefix. */
  function whipUrl(query) {
    const url = new URL("whip", window.location.href);
    url.search = query ? new URLSearchParams(query).toString() : "";
    url.hash = "";
    return url.toString();
  }

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  function randomName() {
    const a = new Uint8Array(3);
    crypto.getRandomValues(a);
    return "browser-" + [...a].map((b) => b.toString(36).padStart(2, "0").slice(-2)).join("");
  }

  // --- what this browser can do --------------------------------------------------

  const canMic = Boolean(window.isSecureContext && navigator.mediaDevices &&
    typeof navigator.mediaDevices.getUserMedia === "function");
  const canCapture = typeof HTMLMediaElement !== "undefined" &&
    (typeof HTMLMediaElement.prototype.captureStream === "function" ||
     typeof HTMLMediaElement.prototype.mozCaptureStream === "function");
  const canRtc = typeof window.RTCPeerConnection === "function";

  // --- one publication at a time -------------------------------------------------

  /** The publication under way: {kind, name, pc, stream, location, sid, objectUrl, ended, stopping, ...}. */
  let current = null;
  let lastSid = null; // the WHIP session whose card is marked as this page's
  let lastName = null; // and the name it was asked for

  function setState(kind, text) {
    ui.state.dataset.state = kind; // idle | busy | live | error
    ui.state.textContent = text;
    ui.state.title = text;
  }

  function setBusy(busy) {
    ui.mic.disabled = busy;
    ui.file.disabled = busy;
    ui.name.disabled = busy;
    ui.fileLabel.dataset.disabled = busy ? "yes" : "no";
    ui.stop.hidden = !busy;
    ui.stop.disabled = false;
    ui.bar.dataset.publishing = busy ? "yes" : "no";
  }

  /** The stream name from the field, checked as the monitor checks it; throws a readable error. */
  function chosenName() {
    const name = ui.name.value.trim() || randomName();
    ui.name.value = name;
    if (!NAME_RE.test(name)) {
      throw new Error("the stream name may have 1–64 of A–Z a–z 0–9 _ . : -");
    }
    return name;
  }

  function describe(err) {
    if (!err) return "unknown error";
    switch (err.name) {
      case "NotAllowedError": return "the browser was not allowed to use the microphone";
      case "NotFoundError": return "no microphone found";
      case "NotReadableError": return "the microphone is in use or cannot be read";
      case "OverconstrainedError": return "the microphone cannot record without its processing";
      default: return err.message || String(err);
    }
  }

  function fail(pub, err) {
    if (pub !== current || pub.stopping) return; // a stop came first
    setState("error", `error: ${describe(err)}`);
    teardown(pub, true);
  }

  // --- publishing -------------------------------------------------------------------

  async function publishMic() {
    if (current) return;
    let pub;
    try {
      pub = begin("microphone", chosenName());
      setState("busy", "starting the microphone…");
      pub.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
        video: false,
      });
      if (pub !== current) return stopTracks(pub.stream);
      const track = pub.stream.getAudioTracks()[0];
      if (!track) throw new Error("the microphone gave no audio track");
      await send(pub, track);
    } catch (err) {
      if (pub) fail(pub, err);
      else setState("error", `error: ${describe(err)}`);
    }
  }

  async function publishFile(file) {
    if (current || !file) return;
    let pub;
    try {
      pub = begin("file", chosenName());
      setState("busy", `opening ${file.name}…`);
      pub.objectUrl = URL.createObjectURL(file);
      const audio = ui.audio;
      audio.src = pub.objectUrl;
      audio.loop = false;
      audio.hidden = false;
      audio.title = file.name;
      await new Promise((resolve, reject) => {
        const ok = () => { off(); resolve(); };
        const bad = () => { off(); reject(new Error(`cannot play ${file.name}: ${mediaError(audio)}`)); };
        const off = () => { audio.removeEventListener("canplay", ok); audio.removeEventListener("error", bad); };
        audio.addEventListener("canplay", ok);
        audio.addEventListener("error", bad);
      });
      if (pub !== current) return;
      try {
        await audio.play();
      } catch (err) {
        if (err.name !== "NotAllowedError") throw err;
        // No user gesture left (a slow file dialog): the person presses play on the player.
        setState("busy", "press ▶ on the player to start");
        await new Promise((resolve) => audio.addEventListener("playing", resolve, { once: true }));
      }
      if (pub !== current) return;
      const captured = audio.captureStream ? audio.captureStream() : audio.mozCaptureStream();
      pub.stream = captured;
      const track = captured.getAudioTracks()[0] || await new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`${file.name} has no audio`)), TRACK_TIMEOUT_MS);
        captured.addEventListener("addtrack", (e) => {
          if (e.track.kind === "audio") { clearTimeout(t); resolve(e.track); }
        });
      });
      if (pub !== current) return;
      pub.onEnded = () => { if (pub === current) stop("the file has ended"); };
      audio.addEventListener("ended", pub.onEnded);
      await send(pub, track);
    } catch (err) {
      if (pub) fail(pub, err);
      else setState("error", `error: ${describe(err)}`);
    }
  }

  function mediaError(audio) {
    const e = audio.error;
    if (!e) return "unknown error";
    const codes = { 1: "aborted", 2: "network error", 3: "it cannot be decoded", 4: "the format is not supported" };
    return codes[e.code] || e.message || `media error ${e.code}`;
  }

  function begin(kind, name) {
    current = { kind, name, pc: null, stream: null, location: null, sid: null, objectUrl: null, ended: false,
                stopping: false, onEnded: null, timer: 0, lostTimer: 0 };
    unmark();
    setBusy(true);
    return current;
  }

  /** Offer, gather, POST, answer: the track goes out once ICE and DTLS connect. */
  async function send(pub, track) {
    setState("busy", "connecting…");
    const pc = pub.pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    const tr = pc.addTransceiver(track, { direction: "sendonly", streams: [pub.stream] });
    preferOpus(tr);
    pc.addEventListener("connectionstatechange", () => onConnection(pub));
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    if (pub !== current) return;
    const resp = await fetch(whipUrl({ stream: pub.name }), {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/sdp" }),
      body: pc.localDescription.sdp,
      cache: "no-store",
    });
    const body = await resp.text();
    if (resp.status !== 201) {
      throw new Error(`the monitor refused (${resp.status}${resp.statusText ? " " + resp.statusText : ""}): ` +
        (body.trim() || "no reason given"));
    }
    const loc = resp.headers.get("Location");
    if (loc) {
      pub.location = new URL(loc, resp.url).toString();
      pub.sid = decodeURIComponent(new URL(pub.location).pathname.split("/").pop() || "");
    }
    if (pub !== current) { // stopped while the offer was out
      if (pub.location) del(pub.location).catch(() => {});
      return;
    }
    await pc.setRemoteDescription({ type: "answer", sdp: body });
    lastSid = pub.sid || `name:${pub.name}`;
    lastName = pub.name;
    markMine();
    pub.timer = setTimeout(() => {
      if (pub === current && pc.connectionState !== "connected") {
        fail(pub, new Error("no connection to the monitor (ICE): is its --ice-host reachable from here?"));
      }
    }, CONNECT_TIMEOUT_MS);
    onConnection(pub);
  }

  function onConnection(pub) {
    if (pub !== current || !pub.pc || pub.stopping) return;
    const st = pub.pc.connectionState;
    if (st === "connected") {
      clearTimeout(pub.timer);
      clearTimeout(pub.lostTimer);
      pub.lostTimer = 0;
      setState("live", `publishing ${pub.kind === "file" ? "the file" : "the microphone"} as ${shownName(pub)}`);
    } else if (st === "failed" || st === "closed") {
      fail(pub, new Error("the connection to the monitor was lost"));
    } else if (st === "disconnected" && !pub.lostTimer) {
      setState("busy", "connection interrupted, waiting…");
      pub.lostTimer = setTimeout(() => fail(pub, new Error("the connection to the monitor was lost")), LOST_AFTER_MS);
    }
  }

  /** The name the stream has on the monitor (made unique there if another live stream has it). */
  function shownName(pub) {
    const [card] = findCard(pub.sid, pub.name);
    return (card && card.dataset.stream) || pub.name;
  }

  /** Wait until ICE gathering completes, at most GATHER_TIMEOUT_MS. */
  function gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const t = setTimeout(done, GATHER_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  /** Opus first among the codecs offered (the browser's default too, but not guaranteed). */
  function preferOpus(transceiver) {
    if (typeof transceiver.setCodecPreferences !== "function") return;
    for (const caps of [window.RTCRtpReceiver, window.RTCRtpSender]) {
      const codecs = caps && caps.getCapabilities && (caps.getCapabilities("audio") || {}).codecs;
      if (!codecs || !codecs.length) continue;
      const opus = codecs.filter((c) => /\/opus$/i.test(c.mimeType));
      if (!opus.length) return;
      try {
        transceiver.setCodecPreferences([...opus, ...codecs.filter((c) => !opus.includes(c))]);
        return;
      } catch (e) {
        // this browser wants the other list: try it, else keep its own order
      }
    }
  }

  // --- stopping -----------------------------------------------------------------------

  function del(location, keepalive) {
    return fetch(location, { method: "DELETE", headers: authHeaders(), cache: "no-store", keepalive: !!keepalive });
  }

  async function stop(why) {
    const pub = current;
    if (!pub || pub.stopping) return;
    pub.stopping = true; // the monitor closing its side now is no error
    ui.stop.disabled = true;
    setState("busy", "stopping…");
    let error = "";
    if (pub.location) {
      try {
        const r = await del(pub.location);
        // 404: the monitor had ended the session already (timeout, restart): nothing left to end.
        if (!r.ok && r.status !== 404) error = `the monitor answered ${r.status}: ${(await r.text()).trim()}`;
      } catch (err) {
        error = `cannot reach the monitor: ${describe(err)}`;
      }
    }
    teardown(pub, false);
    if (error) setState("error", `stopped here; ${error}`);
    else setState("idle", `stopped${why ? ` (${why})` : ""}: ${pub.name}`);
  }

  /** Release everything of a publication; `tellServer`: also end its session (after an error). */
  function teardown(pub, tellServer) {
    if (pub.ended) return;
    pub.ended = true;
    clearTimeout(pub.timer);
    clearTimeout(pub.lostTimer);
    if (tellServer && pub.location) del(pub.location).catch(() => {});
    if (pub.pc) pub.pc.close();
    stopTracks(pub.stream);
    if (pub.onEnded) ui.audio.removeEventListener("ended", pub.onEnded);
    if (pub.kind === "file") {
      ui.audio.pause();
      ui.audio.removeAttribute("src");
      ui.audio.load();
      ui.audio.hidden = true;
      ui.file.value = "";
    }
    if (pub.objectUrl) URL.revokeObjectURL(pub.objectUrl);
    if (pub === current) {
      current = null;
      setBusy(false);
    }
  }

  function stopTracks(stream) {
    if (stream) for (const t of stream.getTracks()) t.stop();
  }

  // --- this page's card -------------------------------------------------------------------

  let mineCard = null; // the card marked as this page's stream
  let mineStream = null; // the panel's state of that stream, when found by its WHIP session (not just by name)
  let scrolledTo = null;

  /** A WHIP session's stream in the panel's state: the one whose detail names the session, or null. */
  function streamOf(sid) {
    const panel = window.scoreqPanel;
    if (sid && panel && panel.state && panel.state.streams) {
      for (const s of panel.state.streams.values()) {
        if (s.detail && s.detail.includes(`WHIP session ${sid}`)) return s;
      }
    }
    return null;
  }

  /** [card, stream state or null]: the session's card, else the card of the name asked for. */
  function findCard(sid, name) {
    const s = streamOf(sid);
    const n = s ? s.name : name;
    const card = n ? ui.grid.querySelector(`.card[data-stream="${CSS.escape(n)}"]`) : null;
    return card ? [card, s] : [null, null];
  }

  /** Mark (and once scroll to) this page's card; cheap when it is marked already. */
  function markMine() {
    if (!lastSid) return;
    if (!(mineCard && mineCard.isConnected && mineCard.dataset.mine === "yes" && mineStream)) {
      const [card, s] = findCard(lastSid, lastName);
      if (!card) return;
      if (mineCard && mineCard !== card) delete mineCard.dataset.mine;
      mineCard = card;
      mineStream = s;
      card.dataset.mine = "yes";
      if (scrolledTo !== lastSid) {
        scrolledTo = lastSid;
        card.scrollIntoView({ block: "nearest", behavior: "smooth" });
      }
      if (current && current.sid === lastSid) onConnection(current); // the name as the monitor shows it
    }
    endedByMonitor();
  }

  /** The feed says this session's stream has ended (timeout, monitor stopping) while it is published: stop here. */
  function endedByMonitor() {
    const pub = current;
    if (!pub || pub.stopping || !pub.sid || pub.sid !== lastSid || !mineStream) return;
    if (mineStream !== streamOf(pub.sid)) return; // the panel rebuilt its state (a reconnect): found again next time
    const st = mineStream.state;
    const why = { ended: "the monitor has ended the stream (no audio came for a while?)",
                  stopped: "the monitor has stopped",
                  error: `the stream failed on the monitor: ${mineStream.error || "error"}` }[st];
    if (why) fail(pub, new Error(why));
  }

  function unmark() {
    lastSid = lastName = mineCard = mineStream = null;
    for (const c of ui.grid.querySelectorAll('.card[data-mine="yes"]')) delete c.dataset.mine;
  }

  // Cards come and go with the feed (a reconnect rebuilds them all): mark ours when they change.
  new MutationObserver(markMine).observe(ui.grid, { childList: true });
  setInterval(markMine, 500); // a card's detail and state are drawn a frame after it appears

  // --- wiring ---------------------------------------------------------------------------------

  ui.name.value = randomName();
  ui.mic.addEventListener("click", publishMic);
  ui.file.addEventListener("change", () => publishFile(ui.file.files && ui.file.files[0]));
  ui.stop.addEventListener("click", () => stop(""));
  // Closing the tab ends the session at once rather than after the monitor's timeout.
  window.addEventListener("pagehide", () => {
    if (current && current.location) del(current.location, true).catch(() => {});
  });

  /** Show the controls if the monitor takes publishers here and this browser can publish. */
  async function detect() {
    if (!canRtc || (!canMic && !canCapture)) return false;
    let resp;
    try {
      resp = await fetch(whipUrl(), { method: "OPTIONS", cache: "no-store" });
    } catch (err) {
      return false; // no answer: nothing to offer
    }
    if (!resp.ok) return false; // 404: this monitor takes no publishers (or only on its own --whip address)
    ui.mic.hidden = !canMic;
    ui.fileLabel.hidden = !canCapture;
    if (!canMic) ui.note.textContent = "the microphone needs https:// or localhost";
    setState("idle", "");
    setBusy(false);
    ui.bar.hidden = false;
    return true;
  }

  // For tests: what is being published, read-only.
  window.scoreqPublish = {
    get current() {
      return current && { kind: current.kind, name: current.name, location: current.location, sid: current.sid,
                          connection: current.pc ? current.pc.connectionState : null };
    },
  };

  ui.bar.dataset.available = "checking";
  detect().then((yes) => { ui.bar.dataset.available = yes ? "yes" : "no"; });
})();
