/*!
 * Errand chat widget — a one-tag embed:
 *
 *   <script src="http://HOST/widget.js" data-token="tok-…" data-lang="zh"></script>
 *
 * adds a floating chat button that opens the Errand chat page (served by
 * HOST) in an iframe. The token travels in the iframe URL's hash, which is
 * never sent to a server and which the page removes from its address bar.
 *
 * Script attributes (all optional but data-token):
 *   data-token     the user's bearer token
 *   data-lang      en | zh | ko
 *   data-position  right (default) | left
 *   data-open      "true": open the chat at once
 *   data-confirm   "host": the host page answers confirmation requests
 *                  itself (see "answer" below) instead of the chat's dialog
 *   data-label     the button's accessible name (default "Chat")
 *
 * JavaScript API (window.ErrandWidget):
 *   open(), close(), toggle(), isOpen()
 *   send(text)            sends a message as if typed
 *   answer(token, yes)    with data-confirm="host": answers a confirmation
 *   on(type, fn)          -> unsubscribe; type as in the events below, or "*"
 *   destroy()             removes the button and the iframe
 *
 * Events for the host page. Each one is delivered three ways:
 *   1. window.postMessage to the host window itself:
 *        {source: "errand-widget", type: "errand:confirmation", data: {...}}
 *      listen with  window.addEventListener("message", e => {
 *        if (e.source === window && e.data && e.data.source === "errand-widget") …})
 *   2. a CustomEvent on window with the same type, detail = data:
 *        window.addEventListener("errand:payment", e => e.detail …)
 *   3. callbacks registered with ErrandWidget.on(type, fn)
 * and, when the host page is itself in a mini-program web-view, also to
 * wx.miniProgram.postMessage({data: msg}) / my.postMessage(msg).
 *
 *   errand:ready         {session, user, model}  the chat is connected
 *   errand:confirmation  the protocol's confirmation frame: token, tool, app,
 *                        summary, amount (minor units), currency,
 *                        amount_display, payment_method, expires_ms
 *   errand:payment       payment frame: out_trade_no, status (paid | failed |
 *                        unknown), amount, currency, transaction_id, reason
 *   errand:order         order frame: app, order_id, status, order
 *   errand:open / errand:close   the chat panel was opened / closed
 */
(function () {
  "use strict";
  if (window.ErrandWidget) return; // loaded twice

  var script = document.currentScript;
  if (!script) {
    var all = document.getElementsByTagName("script");
    for (var i = all.length - 1; i >= 0; i--) {
      if (/\/widget\.js(\?|#|$)/.test(all[i].src || "")) {
        script = all[i];
        break;
      }
    }
  }
  if (!script || !script.src) return;

  var base = new URL(script.src, location.href).origin;
  var cfg = {
    token: script.getAttribute("data-token") || "",
    lang: script.getAttribute("data-lang") || "",
    position: script.getAttribute("data-position") === "left" ? "left" : "right",
    open: script.getAttribute("data-open") === "true",
    confirm: script.getAttribute("data-confirm") === "host" ? "host" : "",
    label: script.getAttribute("data-label") || "Chat",
  };
  var Z = 2147483000;
  var handlers = {};
  var button = null;
  var dot = null;
  var panel = null;
  var frame = null;
  var opened = false;
  var frameReady = false;
  var outbox = []; // messages for the iframe before it is ready

  function css(node, styles) {
    for (var k in styles) node.style.setProperty(k, styles[k]);
    return node;
  }

  function icon(kind) {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "26");
    svg.setAttribute("height", "26");
    svg.setAttribute("aria-hidden", "true");
    var path = document.createElementNS(ns, "path");
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", "currentColor");
    path.setAttribute("stroke-width", "2");
    path.setAttribute("stroke-linecap", "round");
    path.setAttribute("stroke-linejoin", "round");
    path.setAttribute("d", kind === "close" ? "M6 6l12 12M18 6L6 18" : "M4 5h16v11H9l-5 4z");
    svg.appendChild(path);
    return svg;
  }

  function build() {
    button = document.createElement("button");
    button.type = "button";
    button.setAttribute("aria-label", cfg.label);
    button.setAttribute("data-errand-widget", "button");
    css(button, {
      position: "fixed", bottom: "20px", [cfg.position]: "20px", width: "56px", height: "56px",
      "border-radius": "50%", border: "0", background: "#2f6fed", color: "#fff", cursor: "pointer",
      "box-shadow": "0 6px 20px rgba(20,40,90,.3)", display: "flex", "align-items": "center",
      "justify-content": "center", "z-index": String(Z), padding: "0",
    });
    button.appendChild(icon("chat"));
    dot = css(document.createElement("span"), {
      position: "absolute", top: "6px", right: "6px", width: "11px", height: "11px", "border-radius": "50%",
      background: "#ff4d4f", border: "2px solid #fff", display: "none",
    });
    button.appendChild(dot);
    button.addEventListener("click", toggle);
    document.body.appendChild(button);
    window.addEventListener("resize", layout);
  }

  function layout() {
    if (!panel) return;
    var small = window.innerWidth < 520;
    css(panel, small
      ? { top: "0", bottom: "0", left: "0", right: "0", width: "100%", height: "100%", "border-radius": "0" }
      : { top: "auto", bottom: "88px", left: cfg.position === "left" ? "20px" : "auto",
          right: cfg.position === "right" ? "20px" : "auto", width: "380px",
          height: "min(640px, calc(100vh - 110px))", "border-radius": "16px" });
    // On a phone the panel covers the button; the chat page has its own ✕.
    if (button) button.style.display = small && opened ? "none" : "flex";
  }

  function frameUrl() {
    var h = new URLSearchParams();
    if (cfg.token) h.set("token", cfg.token);
    if (cfg.lang) h.set("lang", cfg.lang);
    h.set("embed", "1");
    if (location.origin && location.origin !== "null") h.set("host", location.origin);
    if (cfg.confirm) h.set("confirm", cfg.confirm);
    return base + "/#" + h.toString();
  }

  function ensureFrame() {
    if (panel) return;
    panel = css(document.createElement("div"), {
      position: "fixed", overflow: "hidden", background: "#fff", "box-shadow": "0 12px 40px rgba(20,30,60,.28)",
      "z-index": String(Z), display: "none",
    });
    panel.setAttribute("data-errand-widget", "panel");
    frame = document.createElement("iframe");
    frame.title = cfg.label;
    frame.src = frameUrl();
    frame.setAttribute("allow", "clipboard-write");
    frame.setAttribute("referrerpolicy", "no-referrer");
    css(frame, { border: "0", width: "100%", height: "100%", display: "block" });
    panel.appendChild(frame);
    document.body.appendChild(panel);
    layout();
  }

  function toFrame(msg) {
    msg.source = "errand-host";
    if (!frame || !frameReady) {
      outbox.push(msg);
      return;
    }
    frame.contentWindow.postMessage(msg, base);
  }

  function emit(type, data) {
    var msg = { source: "errand-widget", type: type, data: data };
    try {
      window.postMessage(msg, location.origin && location.origin !== "null" ? location.origin : "*");
    } catch (e) { /* ignore */ }
    try {
      window.dispatchEvent(new CustomEvent(type, { detail: data }));
    } catch (e) { /* old browser */ }
    var lists = [handlers[type] || [], handlers["*"] || []];
    for (var j = 0; j < lists.length; j++) {
      var list = lists[j].slice();
      for (var i = 0; i < list.length; i++) {
        try { list[i](data, type); } catch (e) { if (window.console) console.error("ErrandWidget handler failed:", e); }
      }
    }
    // A host page inside a mini-program web-view: pass it on.
    try {
      if (window.wx && wx.miniProgram && typeof wx.miniProgram.postMessage === "function") wx.miniProgram.postMessage({ data: msg });
    } catch (e) { /* not WeChat */ }
    try {
      if (window.my && typeof my.postMessage === "function") my.postMessage(msg);
    } catch (e) { /* not Alipay */ }
  }

  window.addEventListener("message", function (ev) {
    if (!frame || ev.source !== frame.contentWindow || ev.origin !== base) return;
    var m = ev.data;
    if (!m || m.source !== "errand" || typeof m.type !== "string") return;
    if (m.type === "ready") {
      frameReady = true;
      var queued = outbox;
      outbox = [];
      for (var i = 0; i < queued.length; i++) frame.contentWindow.postMessage(queued[i], base);
    }
    if (m.type === "close") {
      close();
      return;
    }
    if (!opened && (m.type === "confirmation" || m.type === "payment" || m.type === "order")) {
      dot.style.display = "block";
      if (m.type === "confirmation") open(); // a payment needs the person's eyes
    }
    emit("errand:" + m.type, m.data);
  });

  function open() {
    if (!button) return;
    ensureFrame();
    opened = true;
    panel.style.display = "block";
    dot.style.display = "none";
    button.replaceChild(icon("close"), button.firstChild);
    layout();
    toFrame({ type: "focus" });
    emit("errand:open", null);
  }

  function close() {
    if (!panel || !opened) return;
    opened = false;
    panel.style.display = "none";
    button.replaceChild(icon("chat"), button.firstChild);
    layout();
    emit("errand:close", null);
  }

  function toggle() {
    if (opened) close();
    else open();
  }

  function start() {
    build();
    if (cfg.open) open();
    else if (cfg.confirm === "host") ensureFrame(); // connect now so requests reach the host
  }

  window.ErrandWidget = {
    open: open,
    close: close,
    toggle: toggle,
    isOpen: function () { return opened; },
    send: function (text) {
      ensureFrame();
      toFrame({ type: "send", text: String(text) });
    },
    answer: function (token, yes) {
      toFrame({ type: "answer", token: String(token), yes: yes === true });
    },
    on: function (type, fn) {
      (handlers[type] || (handlers[type] = [])).push(fn);
      return function () {
        var l = handlers[type] || [];
        var i = l.indexOf(fn);
        if (i >= 0) l.splice(i, 1);
      };
    },
    destroy: function () {
      if (panel) panel.remove();
      if (button) button.remove();
      window.removeEventListener("resize", layout);
      panel = frame = button = null;
      opened = false;
    },
  };

  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
