/*!
 * Errand JS SDK — talks the Errand WebSocket chat protocol, version 1
 * (docs/protocol.md). Plain script, no dependencies, no build step:
 *
 *   <script src="/sdk.js"></script>          defines window.Errand
 *   const Errand = require("./sdk.js");      CommonJS (pass `WebSocket` in Node)
 *
 * const client = Errand.connect({
 *   url,        // ws(s)://HOST/v1/ws; default: same origin as the page
 *   token,      // the user's bearer token (required)
 *   session,    // a session id to resume; default: a new session
 *   lastSeq,    // with `session`: the last seq already seen (default 0)
 *   lang,       // "en" | "zh" | "ko" (optional)
 *   storage,    // optional Storage-like object (e.g. sessionStorage): the
 *               // session id and last seq are kept there under
 *               // `${storageKey}.session` / `${storageKey}.last_seq`, and
 *               // read from there when `session` is not given
 *   storageKey, // default "errand"
 *   onConfirm,  // (request) => Promise<boolean>: show your own dialog;
 *               // true sends `confirm`, false sends `decline`, anything
 *               // else (null/undefined) leaves the request open
 *   onPayment,  // (paymentFrame) => void
 *   onEvent,    // (frame) => void — every new frame, after de-duplication
 *   WebSocket,  // a WebSocket constructor (default: the global one)
 *   bridge,     // default true: also forward confirmation / payment / order
 *               // frames to a mini-program host (wx.miniProgram.postMessage,
 *               // my.postMessage) when the page runs inside a web-view
 * });
 *
 * client.send(text)              -> id   a user message
 * client.select(cardId, optId)   -> id   taps a card option
 * client.confirm(token)          -> id   yes to a confirmation request
 * client.decline(token)          -> id   no to a confirmation request
 * client.cancel()                -> id|null  stops the reply being written
 * client.reset()                 starts a new session (forgets the old one)
 * client.close()                 closes for good (no reconnect)
 * client.serverNow()             -> ms   the server's clock, which expires_ms is on
 * client.on(type, fn)            -> unsubscribe function
 *     type: any server frame type ("delta", "card", "confirmation",
 *     "payment", "order", "done", "error", ...), or "*" for every frame, or
 *     one of the SDK's own events:
 *       "status"   {state, attempt?, delay?}  state: "connecting" | "open" |
 *                  "reconnecting" | "closed" | "unauthorized"
 *       "session"  {session, resumed, user, model}   after each welcome
 *       "sent"     the client frame just written to the socket
 *       "pending"  {pending: [frame, ...]}  inputs not yet acked changed
 *       "busy"     {busy}  client.busy changed: true from an input until its
 *                  `done` (or an `error` naming it), or while the welcome
 *                  said a reply was being written
 * client.state, client.session, client.lastSeq, client.busy, client.pending
 *
 * Delivery: every input gets a unique id. Inputs are kept until the server
 * acks them (or answers an `error` naming them) and are sent again, with
 * the same id, after a reconnect; the server runs each id once. Frames
 * whose seq is not above the last seen seq are replays and are dropped.
 * The socket reconnects with exponential backoff (0.5 s … 15 s, jittered)
 * and resumes with `hello` + `session` + `last_seq`. An idle socket is
 * pinged every 20 s; one silent for 45 s is considered dead.
 */
(function (root, factory) {
  "use strict";
  var api = factory(root);
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  } else if (root) {
    root.Errand = api;
  }
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this, function (root) {
  "use strict";

  var PROTOCOL_VERSION = 1;
  var PING_EVERY_MS = 20000;
  var DEAD_AFTER_MS = 45000;
  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 15000;
  var WELCOME_WITHIN_MS = 15000;
  // hello errors after which reconnecting cannot help.
  var FATAL_CODES = { unauthorized: 1, unsupported_version: 1 };

  var counter = 0;
  function newId(prefix) {
    var rand = "";
    try {
      var c = root && root.crypto;
      if (c && typeof c.randomUUID === "function") {
        rand = c.randomUUID().replace(/-/g, "").slice(0, 16);
      } else if (c && typeof c.getRandomValues === "function") {
        var b = new Uint8Array(8);
        c.getRandomValues(b);
        for (var i = 0; i < b.length; i++) rand += (b[i] + 256).toString(16).slice(1);
      }
    } catch (e) {
      rand = "";
    }
    if (!rand) rand = Math.random().toString(36).slice(2, 12);
    counter += 1;
    return (prefix || "c") + "-" + Date.now().toString(36) + "-" + counter.toString(36) + "-" + rand;
  }

  function defaultUrl() {
    var loc = root && root.location;
    if (!loc || !loc.host) return null;
    return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/v1/ws";
  }

  function storageGet(storage, key) {
    try {
      return storage ? storage.getItem(key) : null;
    } catch (e) {
      return null;
    }
  }
  function storageSet(storage, key, value) {
    try {
      if (!storage) return;
      if (value === null || value === undefined) storage.removeItem(key);
      else storage.setItem(key, String(value));
    } catch (e) {
      /* storage full or disabled: resuming after a reload just won't work */
    }
  }

  /** Forwards an event to a mini-program host page, if there is one. */
  function postToHost(kind, frame) {
    var message = { source: "errand", type: kind, data: frame };
    try {
      // WeChat web-view: delivered to the page's bindmessage at certain
      // moments (back navigation, share, destroy).
      var wx = root && root.wx;
      if (wx && wx.miniProgram && typeof wx.miniProgram.postMessage === "function") {
        wx.miniProgram.postMessage({ data: message });
      }
    } catch (e) {
      /* not inside WeChat */
    }
    try {
      // Alipay web-view: delivered to the page's onMessage right away.
      var my = root && root.my;
      if (my && typeof my.postMessage === "function") {
        my.postMessage(message);
      }
    } catch (e) {
      /* not inside Alipay */
    }
  }

  function Client(opts) {
    if (!opts || !opts.token) throw new Error("Errand.connect: a token is required");
    this._opts = opts;
    this._url = opts.url || defaultUrl();
    if (!this._url) throw new Error("Errand.connect: no url given and no page location to derive it from");
    this._WS = opts.WebSocket || (root && root.WebSocket);
    if (!this._WS) throw new Error("Errand.connect: no WebSocket implementation");
    this._storage = opts.storage || null;
    this._key = opts.storageKey || "errand";
    this._handlers = {};
    this._pending = []; // reliable inputs not yet acked, in send order
    this._handledTokens = {}; // confirmation tokens answered or being asked
    this._seenTokens = {}; // confirmation tokens seen in frames
    this._running = {}; // ids of inputs whose reply has not finished (no `done` yet)
    this._serverBusy = false; // welcome said a reply was being written
    this._welcomePending = null;
    this._welcomeTimer = null;
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    this._pingTimer = null;
    this._helloTimer = null;
    this._lastHeard = 0;
    this._welcomed = false;
    this._closedByUser = false;

    var session = opts.session;
    var lastSeq = opts.lastSeq;
    if (session === undefined && this._storage) {
      session = storageGet(this._storage, this._key + ".session");
      lastSeq = Number(storageGet(this._storage, this._key + ".last_seq")) || 0;
    }
    this.session = session || null;
    this.lastSeq = this.session ? Number(lastSeq) || 0 : 0;
    this.lang = opts.lang || null;
    this.state = "connecting";
    this.user = null;
    this.model = null;
    this._open();
  }

  Client.prototype.on = function (type, fn) {
    var list = this._handlers[type] || (this._handlers[type] = []);
    list.push(fn);
    var self = this;
    return function off() {
      var l = self._handlers[type];
      if (!l) return;
      var i = l.indexOf(fn);
      if (i >= 0) l.splice(i, 1);
    };
  };

  Client.prototype._emit = function (type, payload) {
    var lists = [this._handlers[type] || []];
    // "*" sees server frames only, not the SDK's own events.
    if (payload && payload.type === type) lists.push(this._handlers["*"] || []);
    for (var j = 0; j < lists.length; j++) {
      var list = lists[j].slice();
      for (var i = 0; i < list.length; i++) {
        try {
          list[i](payload);
        } catch (e) {
          if (root && root.console) root.console.error("Errand handler for " + type + " failed:", e);
        }
      }
    }
  };

  Client.prototype._setState = function (state, extra) {
    this.state = state;
    var ev = { state: state };
    if (extra) for (var k in extra) ev[k] = extra[k];
    this._emit("status", ev);
  };

  Client.prototype._save = function () {
    if (!this._storage) return;
    storageSet(this._storage, this._key + ".session", this.session);
    storageSet(this._storage, this._key + ".last_seq", this.session ? this.lastSeq : null);
  };

  Client.prototype._open = function () {
    var self = this;
    clearTimeout(this._timer);
    this._timer = null;
    this._welcomed = false;
    this._setState(this._attempt === 0 ? "connecting" : "reconnecting", { attempt: this._attempt });
    var ws;
    try {
      ws = new this._WS(this._url);
    } catch (e) {
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = function () {
      if (self._ws !== ws) return;
      self._lastHeard = Date.now();
      self._sendHello();
      self._startPing();
    };
    ws.onmessage = function (ev) {
      if (self._ws !== ws) return;
      self._lastHeard = Date.now();
      if (typeof ev.data !== "string") return; // the protocol is text only
      var frame;
      try {
        frame = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (frame && typeof frame === "object" && typeof frame.type === "string") self._onFrame(frame);
    };
    ws.onclose = function (ev) {
      if (self._ws !== ws) return;
      self._ws = null;
      self._welcomed = false;
      self._stopPing();
      if (self._closedByUser || self.state === "unauthorized") return;
      if (ev && ev.code === 4401) {
        self._setState("unauthorized");
        return;
      }
      // 4408 = we read too slowly; come back at once and catch up.
      if (ev && ev.code === 4408) self._attempt = 0;
      self._scheduleReconnect();
    };
    ws.onerror = function () {
      /* onclose follows */
    };
  };

  Client.prototype._sendHello = function () {
    var hello = { type: "hello", v: PROTOCOL_VERSION, token: this._opts.token, session: this.session, last_seq: this.session ? this.lastSeq : 0 };
    if (this.lang) hello.lang = this.lang;
    this._write(hello);
    // No welcome in time (a server that wants a fresh socket after an
    // error, a half-open connection): start over on a new socket.
    var self = this;
    var ws = this._ws;
    clearTimeout(this._helloTimer);
    this._helloTimer = setTimeout(function () {
      if (self._ws === ws && ws && !self._welcomed) self._drop();
    }, WELCOME_WITHIN_MS);
  };

  /** Abandons the current socket and reconnects after the usual backoff. */
  Client.prototype._drop = function () {
    var ws = this._ws;
    this._ws = null;
    this._welcomed = false;
    this._stopPing();
    if (ws) {
      try {
        ws.close();
      } catch (e) {
        /* already closing */
      }
    }
    this._scheduleReconnect();
  };

  Client.prototype._scheduleReconnect = function () {
    if (this._closedByUser || this._timer) return;
    var base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, this._attempt));
    var delay = Math.round(base / 2 + Math.random() * (base / 2));
    this._attempt += 1;
    this._setState("reconnecting", { attempt: this._attempt, delay: delay });
    var self = this;
    this._timer = setTimeout(function () {
      self._timer = null;
      self._open();
    }, delay);
  };

  Client.prototype._startPing = function () {
    var self = this;
    this._stopPing();
    this._pingTimer = setInterval(function () {
      var ws = self._ws;
      if (!ws) return;
      var quiet = Date.now() - self._lastHeard;
      if (quiet > DEAD_AFTER_MS) {
        self._drop(); // silent for too long
      } else if (quiet > PING_EVERY_MS / 2) {
        self._write({ type: "ping" });
      }
    }, PING_EVERY_MS);
  };

  Client.prototype._stopPing = function () {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  };

  Client.prototype._write = function (frame) {
    var ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(frame));
    } catch (e) {
      return false;
    }
    if (frame.type !== "ping" && frame.type !== "hello") this._emit("sent", frame);
    return true;
  };

  Client.prototype._pendingChanged = function () {
    this._emit("pending", { pending: this._pending.slice() });
  };

  Client.prototype._dropPending = function (id) {
    for (var i = 0; i < this._pending.length; i++) {
      if (this._pending[i].id === id) {
        this._pending.splice(i, 1);
        this._pendingChanged();
        return true;
      }
    }
    return false;
  };

  /** Queues a reliable input and writes it now if the session is open. */
  Client.prototype._input = function (frame) {
    if (this._closedByUser) throw new Error("Errand client is closed");
    frame.id = frame.id || newId(frame.type === "message" ? "m" : frame.type.charAt(0));
    this._pending.push(frame);
    this._busyChange(function () {
      this._running[frame.id] = true;
    });
    this._pendingChanged();
    if (this._welcomed) this._write(frame);
    return frame.id;
  };

  Object.defineProperty(Client.prototype, "pending", {
    get: function () {
      return this._pending.slice();
    },
  });

  /** True while a reply is being written or an input waits for its reply. */
  Object.defineProperty(Client.prototype, "busy", {
    get: function () {
      if (this._serverBusy) return true;
      for (var k in this._running) return true;
      return false;
    },
  });

  Client.prototype._busyChange = function (fn) {
    var before = this.busy;
    fn.call(this);
    if (this.busy !== before) this._emit("busy", { busy: this.busy });
  };

  Client.prototype.send = function (text) {
    text = String(text == null ? "" : text);
    if (!text.trim()) throw new Error("Errand: empty message");
    return this._input({ type: "message", text: text });
  };

  Client.prototype.select = function (cardId, optionId) {
    return this._input({ type: "select", card: String(cardId), option: String(optionId) });
  };

  Client.prototype.confirm = function (token) {
    this._handledTokens[token] = "confirmed";
    return this._input({ type: "confirm", token: String(token) });
  };

  Client.prototype.decline = function (token) {
    this._handledTokens[token] = "declined";
    return this._input({ type: "decline", token: String(token) });
  };

  /** Stops the reply being written. Not queued: a cancel is only useful now. */
  Client.prototype.cancel = function () {
    var id = newId("x");
    return this._welcomed && this._write({ type: "cancel", id: id }) ? id : null;
  };

  /** Forgets the session and starts a new one on a fresh connection. */
  Client.prototype.reset = function () {
    this._closedByUser = false;
    // The old session is deleted, not just forgotten, so it does not count
    // against the person's sessions (best effort: the server also evicts
    // the least recently used one).
    if (this.session && typeof fetch === "function") {
      var http = this._url.replace(/^ws/, "http").replace(/\/v1\/ws.*$/, "");
      try {
        fetch(http + "/v1/sessions/" + encodeURIComponent(this.session), {
          method: "DELETE",
          headers: { Authorization: "Bearer " + this._opts.token },
        }).catch(function () {});
      } catch (e) {
        /* ignore */
      }
    }
    this.session = null;
    this.lastSeq = 0;
    this._pending = [];
    this._handledTokens = {};
    this._seenTokens = {};
    this._busyChange(function () {
      this._running = {};
      this._serverBusy = false;
    });
    this._pendingChanged();
    this._save();
    this._reconnectNow();
  };

  // Forgets the current socket (closing it quietly) and its keep-alive.
  Client.prototype._dropSocket = function () {
    var ws = this._ws;
    this._ws = null;
    this._stopPing();
    if (ws) {
      try {
        ws.close(1000);
      } catch (e) {
        /* ignore */
      }
    }
  };

  Client.prototype._reconnectNow = function () {
    this._dropSocket();
    this._attempt = 0;
    clearTimeout(this._timer);
    this._timer = null;
    this._open();
  };

  Client.prototype.close = function () {
    this._closedByUser = true;
    clearTimeout(this._helloTimer);
    clearTimeout(this._welcomeTimer);
    clearTimeout(this._timer);
    this._timer = null;
    this._dropSocket();
    this._setState("closed");
  };

  Client.prototype._onFrame = function (f) {
    // Replays of frames already seen (after a resume, or a duplicate id).
    if (f.type !== "welcome" && typeof f.seq === "number") {
      if (f.seq <= this.lastSeq) return;
      this.lastSeq = f.seq;
    }

    switch (f.type) {
      case "welcome":
        this._onWelcome(f);
        break;
      case "ack":
        this._dropPending(f.id || f.reply_to);
        break;
      case "error":
        this._onError(f);
        break;
      case "confirmation":
        if (f.token) this._seenTokens[f.token] = true;
        break;
      case "done":
        this._busyChange(function () {
          this._serverBusy = false;
          if (f.reply_to) delete this._running[f.reply_to];
        });
        break;
      case "bye":
        // The server is going away; it closes the socket and we come back.
        break;
      default:
        break;
    }

    if (typeof f.seq === "number" || f.type === "welcome") this._save();
    if (typeof this._opts.onEvent === "function") {
      try {
        this._opts.onEvent(f);
      } catch (e) {
        if (root && root.console) root.console.error("Errand onEvent failed:", e);
      }
    }
    this._emit(f.type, f);

    if (f.type === "confirmation") this._onConfirmation(f);
    else if (f.type === "payment") {
      postToHostIf(this, "payment", f);
      if (typeof this._opts.onPayment === "function") {
        try {
          this._opts.onPayment(f);
        } catch (e) {
          if (root && root.console) root.console.error("Errand onPayment failed:", e);
        }
      }
    } else if (f.type === "order") postToHostIf(this, "order", f);

    if (this._welcomePending && this.lastSeq >= this._replayUntil) this._askWelcomePending();
  };

  function postToHostIf(client, kind, frame) {
    if (client._opts.bridge !== false) postToHost(kind, frame);
  }

  // The server's clock, which times in frames (expires_ms) are on: it can
  // be pinned (tests, evaluations) or just differ from this machine's.
  Client.prototype.serverNow = function () {
    return Date.now() + (this._clockSkew || 0);
  };

  Client.prototype._onWelcome = function (f) {
    if (typeof f.now_ms === "number") this._clockSkew = f.now_ms - Date.now();
    var resumed = !!f.resumed;
    var latest = typeof f.seq === "number" ? f.seq : 0;
    if (!resumed || f.session !== this.session) {
      // A new session: seqs start again.
      this.lastSeq = latest;
      this._handledTokens = {};
      this._seenTokens = {};
    } else if (latest < this.lastSeq) {
      // The server knows fewer frames than we saw (it lost some): trust it.
      this.lastSeq = latest;
    }
    this.session = f.session || null;
    this.user = f.user || null;
    this.model = f.model || null;
    this._busyChange(function () {
      this._serverBusy = !!f.busy;
    });
    this._welcomed = true;
    clearTimeout(this._helloTimer);
    this._attempt = 0;
    this._setState("open");
    this._emit("session", { session: this.session, resumed: resumed, user: this.user, model: this.model });
    // Inputs the server may not have got: same ids, so none runs twice.
    for (var i = 0; i < this._pending.length; i++) this._write(this._pending[i]);
    // A confirmation request still open, which we may have lost (a page
    // reload): offer it once the frames being replayed have been seen,
    // unless one of them was that very request.
    clearTimeout(this._welcomeTimer);
    this._welcomePending = f.pending && f.pending.token ? f.pending : null;
    this._replayUntil = latest;
    if (this._welcomePending) {
      var self = this;
      if (this.lastSeq >= latest) {
        this._welcomeTimer = setTimeout(function () {
          self._askWelcomePending();
        }, 0);
      } else {
        // In case the server replays fewer frames than it announced.
        this._welcomeTimer = setTimeout(function () {
          self._askWelcomePending();
        }, 2000);
      }
    }
  };

  Client.prototype._askWelcomePending = function () {
    var p = this._welcomePending;
    clearTimeout(this._welcomeTimer);
    this._welcomePending = null;
    if (!p || !this._welcomed || this._seenTokens[p.token] || this._handledTokens[p.token]) return;
    if (p.expires_ms && p.expires_ms < this.serverNow()) return;
    var req = {};
    for (var k in p) req[k] = p[k];
    req.type = "confirmation";
    req.from_welcome = true;
    this._seenTokens[p.token] = true;
    if (typeof this._opts.onEvent === "function") {
      try {
        this._opts.onEvent(req);
      } catch (e) {
        if (root && root.console) root.console.error("Errand onEvent failed:", e);
      }
    }
    this._emit("confirmation", req);
    this._onConfirmation(req);
  };

  Client.prototype._onError = function (f) {
    var about = f.id || f.reply_to;
    if (about) {
      this._dropPending(about);
      // The input was refused (busy, rate_limited, too_large, …), failed
      // or was cancelled: no more reply is coming for it.
      this._busyChange(function () {
        delete this._running[about];
      });
    }
    if (this._welcomed || !FATAL_CODES[f.code]) {
      if (f.code === "not_found" && !this._welcomed) {
        // The session to resume is gone: start a new one.
        this.session = null;
        this.lastSeq = 0;
        this._save();
        this._sendHello();
      } else if (f.code === "no_hello" && !this._welcomed) {
        this._sendHello();
      }
      return;
    }
    // unauthorized or unsupported_version during hello.
    this._closedByUser = f.code !== "unauthorized";
    if (f.code === "unauthorized") this._setState("unauthorized");
    else this._setState("closed", { reason: f.code });
    this._dropSocket();
  };

  Client.prototype._onConfirmation = function (req) {
    if (!req.token || this._handledTokens[req.token]) return;
    postToHostIf(this, "confirmation", req);
    var ask = this._opts.onConfirm;
    if (typeof ask !== "function") return; // the page answers with confirm()/decline()
    this._handledTokens[req.token] = "asking";
    var self = this;
    var answer;
    try {
      answer = ask(req);
    } catch (e) {
      answer = false;
    }
    Promise.resolve(answer).then(
      function (yes) {
        if (self._handledTokens[req.token] !== "asking") return; // answered elsewhere
        if (yes === true) self.confirm(req.token);
        else if (yes === false) self.decline(req.token);
        else delete self._handledTokens[req.token];
      },
      function () {
        if (self._handledTokens[req.token] === "asking") self.decline(req.token);
      }
    );
  };

  return {
    version: "1.0.0",
    protocol: PROTOCOL_VERSION,
    connect: function (opts) {
      return new Client(opts);
    },
    newId: newId,
    defaultUrl: defaultUrl,
  };
});
