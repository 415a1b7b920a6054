/*
 * chatgateway web chat: the chat page (/chat/<tenant>, / for the default tenant) and the
 * embeddable widget (<script src=".../widget.js" data-tenant="..." async></script>).
 * Plain JavaScript, no build step, no dependencies. See docs/web-chat.md.
 */
(function () {
  "use strict";

  const script = document.currentScript;
  const TENANT_HEADER = "X-Chatgateway-Tenant";
  const NDJSON = "application/x-ndjson";
  /** How often the page asks whether an answer the agent sends later has arrived. */
  const PENDING_POLL_MS = 1500;
  let counter = 0;

  // DOM helpers ---------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === false || value === null || value === undefined) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
    return node;
  }

  const ICONS = {
    send: ["M12 19V5", "M5.5 11.5 12 5l6.5 6.5"],
    chat: ["M21 11.5c0 4.4-4 8-9 8a10 10 0 0 1-3.6-.7L3.5 20.5l1.4-4A7.5 7.5 0 0 1 3 11.5c0-4.4 4-8 9-8s9 3.6 9 8z"],
    close: ["M6 6l12 12", "M18 6 6 18"],
    plus: ["M12 5v14", "M5 12h14"],
    clip: ["M20.5 11.5 12.4 19.6a5 5 0 0 1-7.1-7.1l8.2-8.2a3.3 3.3 0 0 1 4.7 4.7l-8.2 8.2a1.7 1.7 0 0 1-2.4-2.4l7.5-7.5"],
    alert: ["M12 8v5", "M12 16.5v.01", "M10.3 3.9 2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z"],
    file: ["M14 3H7a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h10a2 2 0 0 0 2-2V8z", "M14 3v5h5", "M9 13h6", "M9 17h4"],
  };

  function icon(name) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    svg.setAttribute("class", "cg-icon cg-icon-" + name);
    for (const d of ICONS[name]) {
      const path = document.createElementNS(ns, "path");
      path.setAttribute("d", d);
      svg.append(path);
    }
    return svg;
  }

  // A small, safe subset of Markdown for agent answers: built as DOM nodes, never as HTML.
  const BULLET = /^\s*[-*\u2022]\s+/;
  const NUMBERED = /^\s*\d+[.)]\s+/;
  const HEADING = /^#{1,6}\s+/;
  const FENCE = /^\s*```/;
  const INLINE = new RegExp(
    [
      "`([^`\\n]+)`",
      "\\*\\*([^*\\n]+)\\*\\*",
      "\\[([^\\]\\n]+)\\]\\(((?:https?:\\/\\/|mailto:)[^\\s)]+)\\)",
      "(https?:\\/\\/[^\\s<>\"]*[^\\s<>\"'.,;:!?)\\]])",
      "\\*([^*\\s][^*\\n]*?)\\*",
    ].join("|"),
    "g",
  );

  function link(href, text) {
    return el("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" }, text);
  }

  function inline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      parent.append(text.slice(last, m.index));
      if (m[1] !== undefined) parent.append(el("code", {}, m[1]));
      else if (m[2] !== undefined) parent.append(el("strong", {}, m[2]));
      else if (m[3] !== undefined) parent.append(link(m[4], m[3]));
      else if (m[5] !== undefined) parent.append(link(m[5], m[5]));
      else parent.append(el("em", {}, m[6]));
      last = m.index + m[0].length;
    }
    parent.append(text.slice(last));
  }

  function renderRich(target, text) {
    target.textContent = "";
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    const plain = (line) =>
      line.trim() && !FENCE.test(line) && !BULLET.test(line) && !NUMBERED.test(line) && !HEADING.test(line);
    while (i < lines.length) {
      const line = lines[i];
      if (FENCE.test(line)) {
        const code = [];
        for (i++; i < lines.length && !FENCE.test(lines[i]); i++) code.push(lines[i]);
        i++;
        target.append(el("pre", {}, el("code", {}, code.join("\n"))));
      } else if (!line.trim()) {
        i++;
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const ordered = !BULLET.test(line);
        const marker = ordered ? NUMBERED : BULLET;
        const list = el(ordered ? "ol" : "ul");
        for (; i < lines.length && marker.test(lines[i]); i++) {
          const item = el("li");
          inline(item, lines[i].replace(marker, ""));
          list.append(item);
        }
        target.append(list);
      } else if (HEADING.test(line)) {
        const p = el("p", { class: "cg-heading-line" });
        inline(p, line.replace(HEADING, ""));
        target.append(p);
        i++;
      } else {
        const p = el("p");
        for (let first = true; i < lines.length && plain(lines[i]); i++, first = false) {
          if (!first) p.append(el("br"));
          inline(p, lines[i]);
        }
        target.append(p);
      }
    }
  }

  // Storage that survives a reload; in memory when the browser refuses localStorage --------

  function storage(key) {
    let memory = {};
    return {
      load() {
        try {
          const value = JSON.parse(window.localStorage.getItem(key) || "{}");
          return value && typeof value === "object" ? value : {};
        } catch (_) {
          return { ...memory };
        }
      },
      save(state) {
        memory = { ...state };
        try {
          window.localStorage.setItem(key, JSON.stringify(state));
        } catch (_) {
          /* private mode or storage disabled: keep it in memory */
        }
      },
    };
  }

  // The gateway's browser API -------------------------------------------------------------

  class ChatError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status || 0;
      this.code = code || "";
    }
  }

  async function errorFrom(resp) {
    let message = "The chat service answered " + resp.status + ".";
    let code = "";
    try {
      const body = await resp.json();
      if (body && body.error) {
        message = body.error.message || message;
        code = body.error.code || "";
      }
    } catch (_) {
      /* not JSON */
    }
    return new ChatError(message, resp.status, code);
  }

  /** A byte count for people: 25 MB, 300 KB, 12 bytes. */
  function formatSize(bytes) {
    for (const [unit, scale] of [["GB", 2 ** 30], ["MB", 2 ** 20], ["KB", 2 ** 10]]) {
      if (bytes >= scale) {
        const value = bytes / scale;
        return (value >= 10 || value === Math.floor(value) ? value.toFixed(0) : value.toFixed(1)) + " " + unit;
      }
    }
    return bytes + " bytes";
  }

  /** Whether a media type is in the tenant's files.allowed_types (type/* for a family). */
  function typeAllowed(type, allowed) {
    const family = type.split("/")[0] + "/*";
    return allowed.some((t) => t === "*/*" || t === type || t === family);
  }

  function networkError() {
    return new ChatError("Can't reach the chat service. Check your connection and try again.");
  }

  class Client {
    constructor(base, tenant) {
      this.base = base;
      this.tenant = tenant;
      const where = new URL(base);
      this.store = storage("chatgateway:" + where.origin + where.pathname + ":" + tenant);
      this.state = this.store.load();
    }

    url(path) {
      return new URL(path, this.base).href;
    }

    headers(withToken) {
      const headers = { "Content-Type": "application/json", [TENANT_HEADER]: this.tenant };
      if (withToken && this.state.token) headers.Authorization = "Bearer " + this.state.token;
      return headers;
    }

    save() {
      this.store.save(this.state);
    }

    /**
     * Start from a token the site's server minted for its signed-in user (data-token). Without
     * one, forget a stored minted token: the site no longer vouches for that user.
     */
    useToken(token) {
      this.minted = Boolean(token);
      if (token) this.state.token = token;
      else if (this.state.minted) {
        this.state = {};
        this.save();
      }
    }

    async fetch(path, init) {
      try {
        return await window.fetch(this.url(path), init);
      } catch (_) {
        throw networkError();
      }
    }

    async requestToken(withToken) {
      return this.fetch("api/visitor-token", {
        method: "POST",
        headers: this.headers(withToken),
        body: JSON.stringify({ tenantId: this.tenant }),
      });
    }

    /** Get a visitor token (renewing the stored one); returns the tenant's chat settings. */
    async connect() {
      let resp = null;
      if (this.state.token) {
        resp = await this.requestToken(true);
        if (resp.status === 401) resp = null; // expired or not for this tenant: start afresh
      }
      if (resp === null) resp = await this.requestToken(false);
      if (!resp.ok) throw await errorFrom(resp);
      const data = await resp.json();
      if (data.userId !== this.state.userId) this.state = {}; // somebody else: not their session
      this.state.token = data.token;
      this.state.userId = data.userId;
      this.state.minted = Boolean(this.minted);
      this.save();
      return data.chat || {};
    }

    get sessionId() {
      return this.state.sessionId || null;
    }

    forgetSession() {
      delete this.state.sessionId;
      this.save();
    }

    /** The stored conversation's turns, oldest first ([] when there is none). */
    async transcript() {
      if (!this.state.sessionId) return [];
      const path = "api/sessions/" + encodeURIComponent(this.state.sessionId);
      let resp = await this.fetch(path, { headers: this.headers(true) });
      if (resp.status === 401) {
        await this.connect();
        if (!this.state.sessionId) return [];
        resp = await this.fetch(path, { headers: this.headers(true) });
      }
      if (resp.status === 404) {
        this.forgetSession();
        return [];
      }
      if (!resp.ok) throw await errorFrom(resp);
      return (await resp.json()).transcript || [];
    }

    /** Upload a file for the next message; resolves with {fileId, name, contentType, size}. */
    async upload(file) {
      for (let attempt = 0; ; attempt++) {
        const headers = { [TENANT_HEADER]: this.tenant, "Content-Type": file.type || "application/octet-stream" };
        if (this.state.token) headers.Authorization = "Bearer " + this.state.token;
        const resp = await this.fetch("api/files?name=" + encodeURIComponent(file.name), {
          method: "POST",
          headers,
          body: file,
        });
        if (attempt === 0 && resp.status === 401) {
          await this.connect();
          continue;
        }
        if (!resp.ok) throw await errorFrom(resp);
        return resp.json();
      }
    }

    /** `send` with uploaded files' ids attached to the message. */
    async sendWith(files, text, onDelta) {
      return this.send(text, onDelta, files);
    }

    /** The session's answer an agent sends later (a callback): {pending, text, expired}. */
    async pendingAnswer() {
      if (!this.state.sessionId) return { pending: false, text: null };
      const path = "api/sessions/" + encodeURIComponent(this.state.sessionId) + "/callback";
      const resp = await this.fetch(path, { headers: this.headers(true) });
      if (!resp.ok) throw await errorFrom(resp);
      return resp.json();
    }

    /** Send a message; `onDelta` gets each piece of the answer; resolves with the done event. */
    async send(text, onDelta, files, metadata) {
      for (let attempt = 0; ; attempt++) {
        const body = { message: text, userId: this.state.userId };
        if (metadata) body.metadata = metadata; // e.g. {action}: a button was clicked
        if (files && files.length) body.files = files;
        // No known session means the visitor asked for a fresh one (or never had one).
        if (this.state.sessionId) body.sessionId = this.state.sessionId;
        else body.newSession = true;
        const resp = await this.fetch("api/chat/stream", {
          method: "POST",
          headers: { ...this.headers(true), Accept: NDJSON },
          body: JSON.stringify(body),
        });
        if (attempt === 0 && resp.status === 401) {
          await this.connect();
          continue;
        }
        if (attempt === 0 && resp.status === 404 && body.sessionId) {
          this.forgetSession(); // the conversation was deleted or expired on the server
          continue;
        }
        if (!resp.ok) throw await errorFrom(resp);
        return this.read(resp, onDelta);
      }
    }

    async read(resp, onDelta) {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (_) {
          throw new ChatError("The connection broke before the answer was complete.");
        }
        if (chunk.value) buffer += decoder.decode(chunk.value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, end).trim();
          buffer = buffer.slice(end + 1);
          if (!line) continue;
          const event = JSON.parse(line);
          if (event.type === "delta") onDelta(event.text);
          else if (event.type === "done") {
            this.state.sessionId = event.sessionId;
            this.save();
            return event;
          } else if (event.type === "error") {
            throw new ChatError(event.error.message, 0, event.error.code);
          }
        }
        if (chunk.done) throw new ChatError("The connection broke before the answer was complete.");
      }
    }
  }

  // The chat view, shared by the page and the widget ---------------------------------------

  function contrastText(hex) {
    const n = parseInt(hex.slice(1), 16);
    const [r, g, b] = [(n >> 16) & 255, (n >> 8) & 255, n & 255].map((v) => {
      const c = v / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    const luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    return luminance > 0.45 ? "#111827" : "#ffffff";
  }

  function applyAccent(node, accent) {
    if (!/^#[0-9a-fA-F]{6}$/.test(accent || "")) return;
    node.style.setProperty("--cg-accent", accent);
    node.style.setProperty("--cg-on-accent", contrastText(accent));
  }

  class ChatView {
    /**
     * container: where to build the chat; options: {client, title, welcome, heading ("h1" or
     * "h2"), onClose (widget only: shows a close button)}.
     */
    constructor(container, options) {
      this.client = options.client;
      this.title = options.title || "Chat";
      this.busy = false;
      this.ready = false;
      const id = "cg" + ++counter;

      this.status = el("p", { class: "cg-status", id: id + "-status" }, "Connecting\u2026");
      this.newButton = el(
        "button",
        {
          type: "button",
          class: "cg-button cg-new",
          title: "Start a new conversation",
          // The accessible name starts with the visible text, so "click New chat" works by voice.
          "aria-label": "New chat: start a new conversation",
          disabled: true,
          onclick: () => this.newConversation(),
        },
        icon("plus"),
        el("span", { class: "cg-new-label", "aria-hidden": "true" }, "New chat"),
      );
      const closeButton = options.onClose
        ? el(
            "button",
            { type: "button", class: "cg-button cg-close", "aria-label": "Close chat", onclick: options.onClose },
            icon("close"),
          )
        : null;
      this.avatar = el("div", { class: "cg-avatar", "aria-hidden": "true" }, this.initial());
      this.heading = el(options.heading || "h1", { class: "cg-title", id: id + "-title" }, this.title);
      const header = el(
        "header",
        { class: "cg-header" },
        this.avatar,
        el("div", { class: "cg-heading" }, this.heading, this.status),
        el("div", { class: "cg-actions" }, this.newButton, closeButton),
      );

      this.welcome = el("div", { class: "cg-msg cg-agent cg-welcome" });
      this.empty = el(
        "div",
        { class: "cg-empty" },
        el("div", { class: "cg-empty-avatar", "aria-hidden": "true" }, icon("chat")),
        el("p", { class: "cg-empty-title" }, "Chat with " + this.title),
        el("p", { class: "cg-empty-text" }, "Ask a question and the answer appears here as it is written."),
      );
      this.messages = el("div", { class: "cg-messages" });
      this.log = el(
        "div",
        {
          class: "cg-log",
          role: "log",
          "aria-live": "polite",
          "aria-relevant": "additions",
          "aria-labelledby": id + "-title",
          tabindex: "0",
        },
        this.empty,
        this.welcome,
        this.messages,
      );
      this.announcer = el("div", { class: "cg-sr", role: "status", "aria-live": "polite" });

      this.noticeText = el("span", { class: "cg-notice-text" });
      this.notice = el(
        "div",
        { class: "cg-notice", role: "alert", hidden: true },
        icon("alert"),
        this.noticeText,
        el(
          "button",
          { type: "button", class: "cg-notice-dismiss", onclick: () => this.hideNotice() },
          "Dismiss",
        ),
      );

      this.input = el("textarea", {
        id: id + "-input",
        class: "cg-input",
        rows: "1",
        placeholder: "Write a message\u2026",
        "aria-describedby": id + "-hint",
        enterkeyhint: "send",
        maxlength: "32000",
        disabled: true,
      });
      this.sendButton = el(
        "button",
        { type: "submit", class: "cg-send", "aria-label": "Send message", disabled: true },
        icon("send"),
      );
      // Files: picked, checked against the tenant's limits, uploaded at once, sent with the
      // next message (docs/web-chat.md).
      this.pending = null;
      this.fileInput = el("input", {
        type: "file",
        class: "cg-file-input",
        tabindex: "-1",
        "aria-hidden": "true",
        onchange: () => this.pickFile(),
      });
      this.attachButton = el(
        "button",
        {
          type: "button",
          class: "cg-attach",
          "aria-label": "Attach a file",
          disabled: true,
          onclick: () => this.fileInput.click(),
        },
        icon("clip"),
      );
      this.attachments = el("div", { class: "cg-attachments", hidden: true });
      this.input.addEventListener("input", () => {
        this.autosize();
        this.updateSend();
      });
      this.input.addEventListener("keydown", (event) => {
        // Enter sends, Shift+Enter is a new line; never interrupt an IME composition.
        if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
        event.preventDefault();
        this.submit();
      });
      const form = el(
        "form",
        {
          class: "cg-composer",
          onsubmit: (event) => {
            event.preventDefault();
            this.submit();
          },
        },
        el("label", { for: id + "-input", class: "cg-sr" }, "Message to " + this.title),
        this.attachments,
        el("div", { class: "cg-field" }, this.fileInput, this.attachButton, this.input, this.sendButton),
        el("p", { class: "cg-hint", id: id + "-hint" }, "Enter to send \u00b7 Shift+Enter for a new line"),
      );

      this.root = el(
        "section",
        { class: "cg-chat", "aria-labelledby": id + "-title", "data-state": "connecting" },
        header,
        this.log,
        this.notice,
        form,
        this.announcer,
      );
      container.append(this.root);
      this.configure({ welcome: options.welcome });
      // Keep the newest message in view while it grows, the box grows or a notice shows,
      // unless the visitor scrolled up to read.
      this.atEnd = true;
      this.log.addEventListener("scroll", () => (this.atEnd = this.nearEnd()), { passive: true });
      if (window.ResizeObserver) {
        const keep = new ResizeObserver(() => this.scrollToEnd());
        keep.observe(this.log);
        keep.observe(this.messages);
      }
      this.messages.addEventListener("click", (event) => {
        const retry = event.target.closest && event.target.closest(".cg-retry");
        if (retry) this.start();
      });
    }

    initial() {
      return (this.title.trim()[0] || "?").toUpperCase();
    }

    configure(chat) {
      if (chat.title) {
        this.title = chat.title;
        this.heading.textContent = chat.title;
        this.avatar.textContent = this.initial();
      }
      if (chat.welcome !== undefined) {
        this.welcome.textContent = "";
        if (chat.welcome) {
          const bubble = el("div", { class: "cg-bubble" });
          renderRich(bubble, chat.welcome);
          this.welcome.append(bubble);
        }
        this.welcome.hidden = !chat.welcome;
      }
      if (chat.accentColor) applyAccent(this.root, chat.accentColor);
      if (chat.files) this.fileRules = chat.files;
      this.updateEmpty();
    }

    /** Connect (unless already connected) and show the stored conversation. */
    async start(connected) {
      this.setState("connecting", "Connecting\u2026");
      this.hideNotice();
      try {
        if (!connected) this.configure(await this.client.connect());
        const turns = await this.client.transcript();
        this.messages.textContent = "";
        turns.forEach((turn, i) => this.addTurn(turn, turns[i - 1], turns[i + 1]));
        this.scrollToEnd(true);
        // An answer the agent sends later is still to come: wait for it here too.
        if (turns.length && (await this.client.pendingAnswer()).pending) {
          this.awaitAnswer(this.addTyping());
        }
        this.ready = true;
        this.input.disabled = false;
        this.newButton.disabled = false;
        this.setState("ready", "Online");
        this.updateSend();
      } catch (err) {
        this.ready = false;
        this.setState("error", "Unavailable");
        this.messages.textContent = "";
        this.messages.append(
          el(
            "div",
            { class: "cg-unavailable" },
            el("p", {}, "This chat is unavailable right now."),
            el("p", { class: "cg-unavailable-reason" }, err.message),
            el("button", { type: "button", class: "cg-button cg-retry" }, "Try again"),
          ),
        );
        this.updateEmpty();
      }
    }

    setState(state, text) {
      this.root.dataset.state = state;
      this.status.textContent = text;
    }

    focus() {
      this.input.focus();
    }

    autosize() {
      this.input.style.height = "auto";
      this.input.style.height = Math.min(this.input.scrollHeight, 168) + "px";
    }

    updateSend() {
      const uploading = Boolean(this.pending && !this.pending.id);
      const empty = !this.input.value.trim() && !this.pending;
      this.sendButton.disabled = !this.ready || this.busy || uploading || empty;
      if (this.attachButton) this.attachButton.disabled = !this.ready || this.busy || uploading;
    }

    updateEmpty() {
      const hasMessages = this.messages.childElementCount > 0;
      this.empty.hidden = hasMessages || !this.welcome.hidden;
    }

    nearEnd() {
      return this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 48;
    }

    scrollToEnd(force) {
      if (force) this.atEnd = true;
      if (this.atEnd) this.log.scrollTop = this.log.scrollHeight;
    }

    addMessage(role, text, extraClass) {
      const who = role === "user" ? "You" : this.title;
      const bubble = el("div", { class: "cg-bubble" });
      const message = el(
        "div",
        { class: "cg-msg cg-" + role + (extraClass ? " " + extraClass : "") },
        el("span", { class: "cg-sr" }, who + ": "),
        bubble,
      );
      if (role === "user") bubble.textContent = text;
      else renderRich(bubble, text);
      // Buttons are for the message right after them: anything the visitor sends closes them.
      if (role === "user") {
        for (const button of this.messages.querySelectorAll(".cg-choice:not([disabled])")) button.disabled = true;
      }
      this.messages.append(message);
      this.updateEmpty();
      this.scrollToEnd();
      return message;
    }

    /** A stored turn: a choice shows its button's label; an answer its files and buttons. */
    addTurn(turn, previous, next) {
      if (turn.role === "user") {
        const choice = previous && (previous.actions || []).find((a) => a.value === turn.text);
        this.addMessage("user", choice ? choice.label : turn.text);
        return;
      }
      const message = this.addMessage("agent", turn.text);
      this.addExtras(message, turn, next);
    }

    /**
     * Show an answer's files (images inline, other files as download links, both through the
     * gateway's signed links) and buttons under its bubble. `next`: the visitor's turn after
     * it, when there is one (the buttons are then closed, the chosen one marked).
     */
    addExtras(message, answer, next) {
      const files = answer.attachments || [];
      const actions = answer.actions || [];
      if (!files.length && !actions.length) return;
      const extras = el("div", { class: "cg-extras" });
      if (files.length) {
        const list = el("div", { class: "cg-files" });
        for (const file of files) {
          if (/^image\/(png|jpeg|gif|webp|avif)$/.test(file.contentType || "")) {
            list.append(
              el(
                "a",
                { class: "cg-image", href: file.url, target: "_blank", rel: "noopener noreferrer" },
                el("img", { src: file.url, alt: file.name, loading: "lazy" }),
              ),
            );
          } else {
            list.append(
              el(
                "a",
                { class: "cg-file", href: file.url, download: file.name, rel: "noopener noreferrer" },
                icon("file"),
                el("span", { class: "cg-file-name" }, file.name),
                el("span", { class: "cg-sr" }, " (download)"),
              ),
            );
          }
        }
        extras.append(list);
      }
      if (actions.length) {
        const group = el("div", { class: "cg-choices", role: "group", "aria-label": "Choices" });
        const buttons = actions.map((action) => {
          const button = el(
            "button",
            {
              type: "button",
              class: "cg-choice" + (action.style ? " cg-choice-" + action.style : ""),
              "aria-pressed": "false",
              disabled: Boolean(next),
            },
            action.label,
          );
          if (next && next.role === "user" && next.text === action.value) {
            button.classList.add("cg-chosen");
            button.setAttribute("aria-pressed", "true");
          }
          button.addEventListener("click", () => this.choose(action, buttons, button));
          return button;
        });
        group.append(...buttons);
        extras.append(group);
      }
      message.append(extras);
      this.scrollToEnd();
    }

    /** A button clicked: its value goes to the agent as the visitor's next message. */
    async choose(action, buttons, button) {
      if (this.busy || !this.ready || button.disabled) return;
      this.hideNotice();
      this.setBusy(true);
      const sent = this.addMessage("user", action.label); // closes the buttons
      button.classList.add("cg-chosen");
      button.setAttribute("aria-pressed", "true");
      const reply = this.addTyping();
      this.scrollToEnd(true);
      let soFar = "";
      const index = buttons.indexOf(button) + 1;
      const metadata = { action: { value: action.value, label: action.label, index, via: "button" } };
      try {
        const done = await this.client.send(
          action.value,
          (delta) => {
            soFar += delta;
            this.showText(reply, soFar, true);
          },
          [],
          metadata,
        );
        if (done.outcome === "deferred" && this.awaitAnswer) {
          this.awaitAnswer(reply);
        } else if (done.response || done.attachments || done.actions) {
          this.showText(reply, done.response || "", false);
          if (done.outcome === "fallback") reply.classList.add("cg-fallback");
          this.addExtras(reply, done);
        } else {
          reply.remove();
        }
      } catch (err) {
        reply.remove();
        sent.classList.add("cg-failed");
        sent.append(el("span", { class: "cg-failed-note" }, "Not delivered"));
        this.showNotice(err.message);
        button.classList.remove("cg-chosen");
        button.setAttribute("aria-pressed", "false");
        for (const other of buttons) other.disabled = false; // try again
      } finally {
        this.setBusy(false);
        this.updateEmpty();
      }
    }

    addTyping() {
      const message = this.addMessage("agent", "", "cg-typing");
      const bubble = message.querySelector(".cg-bubble");
      bubble.append(
        el("span", { class: "cg-dot" }),
        el("span", { class: "cg-dot" }),
        el("span", { class: "cg-dot" }),
        el("span", { class: "cg-sr" }, this.title + " is typing\u2026"),
      );
      return message;
    }

    showText(message, text, streaming) {
      message.classList.remove("cg-typing");
      message.classList.toggle("cg-streaming", streaming);
      renderRich(message.querySelector(".cg-bubble"), text);
      this.scrollToEnd();
    }

    async submit() {
      const file = this.pending && this.pending.id ? this.pending : null;
      const text = this.input.value.trim() || (file ? file.name : "");
      if (!text || this.busy || !this.ready || (this.pending && !file)) return;
      this.hideNotice();
      this.input.value = "";
      this.autosize();
      this.setBusy(true);
      const sent = this.addMessage("user", text);
      if (file) {
        sent.querySelector(".cg-bubble").append(el("span", { class: "cg-file-note" }, icon("clip"), file.name));
        this.clearFile();
      }
      const reply = this.addTyping();
      this.scrollToEnd(true);
      let soFar = "";
      try {
        const done = await this.client.sendWith(file ? [file.id] : [], text, (delta) => {
          soFar += delta;
          this.showText(reply, soFar, true);
        });
        if (done.outcome === "deferred") {
          this.awaitAnswer(reply); // the agent answers later, to its callback
        } else if (done.response) {
          this.showText(reply, done.response, false);
          if (done.outcome === "fallback") reply.classList.add("cg-fallback");
          this.addExtras(reply, done);
        } else if (done.attachments || done.actions) {
          this.showText(reply, "", false); // files or buttons without words
          this.addExtras(reply, done);
        } else {
          reply.remove();
        }
      } catch (err) {
        reply.remove();
        sent.classList.add("cg-failed");
        sent.append(el("span", { class: "cg-failed-note" }, "Not delivered"));
        this.showNotice(err.message);
        if (!this.input.value) {
          this.input.value = text;
          this.autosize();
        }
      } finally {
        this.setBusy(false);
        this.updateEmpty();
      }
    }

    /** Check the picked file against the tenant's limits and upload it; a refusal shows why. */
    async pickFile() {
      const file = this.fileInput.files && this.fileInput.files[0];
      this.fileInput.value = "";
      if (!file || this.busy) return;
      this.hideNotice();
      const rules = this.fileRules || {};
      const type = (file.type || "application/octet-stream").toLowerCase();
      if (rules.maxBytes && file.size > rules.maxBytes) {
        this.showNotice(
          file.name + " is too large (" + formatSize(file.size) + "): files up to " +
            formatSize(rules.maxBytes) + " can be sent here.",
        );
        return;
      }
      if (rules.allowedTypes && !typeAllowed(type, rules.allowedTypes)) {
        this.showNotice(file.name + " can't be sent here: files of type " + type + " are not accepted.");
        return;
      }
      const pending = { name: file.name, id: null };
      this.pending = pending;
      this.showFile(pending, "Uploading\u2026");
      try {
        const uploaded = await this.client.upload(file);
        if (this.pending !== pending) return;
        pending.id = uploaded.fileId;
        this.showFile(pending, formatSize(uploaded.size));
      } catch (err) {
        if (this.pending === pending) this.clearFile();
        this.showNotice(err.message);
      }
    }

    showFile(pending, detail) {
      this.attachments.textContent = "";
      this.attachments.append(
        el(
          "span",
          { class: "cg-file" },
          icon("clip"),
          el("span", { class: "cg-file-name" }, pending.name),
          el("span", { class: "cg-file-detail" }, detail),
          el(
            "button",
            { type: "button", class: "cg-file-remove", "aria-label": "Remove " + pending.name, onclick: () => this.clearFile() },
            icon("close"),
          ),
        ),
      );
      this.attachments.hidden = false;
      this.updateSend();
    }

    clearFile() {
      this.pending = null;
      this.attachments.textContent = "";
      this.attachments.hidden = true;
      this.updateSend();
    }

    /** Show an answer the agent sends later (a callback): poll until it is there. */
    async awaitAnswer(reply) {
      reply.classList.add("cg-pending");
      const session = this.client.sessionId;
      let seen = null;
      for (;;) {
        await new Promise((resolve) => setTimeout(resolve, PENDING_POLL_MS));
        if (!reply.isConnected || this.client.sessionId !== session) return;
        let state;
        try {
          state = await this.client.pendingAnswer();
        } catch (_) {
          continue; // offline for a moment: ask again
        }
        if (seen === null) seen = state.callbackId;
        if (state.callbackId !== seen) {
          // A later answer is already pending: show the conversation as stored.
          if (!this.busy) this.start(true);
          return;
        }
        if (state.pending) {
          if (state.text) this.showText(reply, state.text, true);
          continue;
        }
        reply.classList.remove("cg-pending");
        if (state.text) {
          this.showText(reply, state.text, false);
          if (state.expired) reply.classList.add("cg-fallback");
        } else {
          reply.remove();
        }
        this.updateEmpty();
        return;
      }
    }

    setBusy(busy) {
      this.busy = busy;
      this.log.setAttribute("aria-busy", busy ? "true" : "false");
      this.newButton.disabled = busy || !this.ready;
      this.setState(busy ? "busy" : "ready", busy ? this.title + " is typing\u2026" : "Online");
      this.updateSend();
    }

    newConversation() {
      if (this.busy) return;
      this.client.forgetSession();
      this.messages.textContent = "";
      this.hideNotice();
      this.updateEmpty();
      this.announcer.textContent = "Started a new conversation.";
      this.input.focus();
    }

    showNotice(text) {
      this.noticeText.textContent = text;
      this.notice.hidden = false;
    }

    hideNotice() {
      this.notice.hidden = true;
    }
  }

  // Page and widget ------------------------------------------------------------------------

  function startPage(root) {
    const data = root.dataset;
    const base = new URL(data.base || "./", window.location.href).href;
    applyAccent(document.documentElement, data.accent);
    const view = new ChatView(root, {
      client: new Client(base, data.tenant),
      title: data.title,
      welcome: data.welcome || null,
      heading: "h1",
    });
    view.start(false).then(() => {
      // Focus the box on desktops; on phones it would pop the keyboard over the conversation.
      if (view.ready && window.matchMedia("(pointer: fine)").matches) view.focus();
    });
    return view;
  }

  function startWidget(tag) {
    const tenant = tag.dataset.tenant;
    const base = new URL(".", tag.src).href;
    const client = new Client(base, tenant);
    client.useToken(tag.dataset.token);
    const announce = (name, detail) =>
      window.dispatchEvent(new CustomEvent("chatgateway:" + name, { detail: { tenant, ...detail } }));
    client.connect().then(
      (chat) => {
        const title = chat.title || "Chat";
        const host = document.createElement("chatgateway-widget");
        host.style.display = "none"; // until the stylesheet is in
        applyAccent(host, chat.accentColor);
        const shadow = host.attachShadow({ mode: "open" });
        const style = el("link", { rel: "stylesheet", href: new URL("static/chat.css", base).href });
        style.addEventListener("load", () => host.style.removeProperty("display"));
        const panelId = "cg-panel-" + ++counter;
        const panel = el("div", { class: "cg-panel", id: panelId, role: "dialog", "aria-label": "Chat with " + title, hidden: true });
        const launcher = el(
          "button",
          {
            type: "button",
            class: "cg-launcher",
            "aria-label": "Open chat with " + title,
            "aria-expanded": "false",
            "aria-controls": panelId,
          },
          icon("chat"),
          icon("close"),
        );
        const wrapper = el("div", { class: "cg-widget" }, panel, launcher);
        shadow.append(style, wrapper);
        let started = false;
        const close = () => {
          panel.hidden = true;
          wrapper.classList.remove("cg-open");
          launcher.setAttribute("aria-expanded", "false");
          launcher.setAttribute("aria-label", "Open chat with " + title);
          launcher.focus();
        };
        const view = new ChatView(panel, { client, title, welcome: chat.welcome, heading: "h2", onClose: close });
        const open = () => {
          panel.hidden = false;
          wrapper.classList.add("cg-open");
          launcher.setAttribute("aria-expanded", "true");
          launcher.setAttribute("aria-label", "Close chat with " + title);
          if (!started) {
            started = true;
            view.start(true).then(() => view.focus());
          } else {
            view.focus();
          }
        };
        launcher.addEventListener("click", () => (panel.hidden ? open() : close()));
        panel.addEventListener("keydown", (event) => {
          if (event.key === "Escape") {
            event.stopPropagation();
            close();
          }
        });
        (document.body || document.documentElement).append(host);
        if (tag.dataset.open === "true") open();
        announce("ready", {});
      },
      (err) => {
        console.error(
          "chatgateway widget: cannot start the chat of tenant " + JSON.stringify(tenant) + ": " +
            err.message + " Check that " + window.location.origin + " is in the tenant's " +
            "web.allowed_origins, that its web chat is public (or data-token is given), and " +
            "that this page's Content-Security-Policy allows " + new URL(base).origin + ".",
        );
        announce("error", { message: err.message, status: err.status || 0 });
      },
    );
  }

  function boot() {
    if (script && script.dataset.tenant) {
      startWidget(script);
      return;
    }
    const root = document.getElementById("chatgateway");
    if (root && root.dataset.tenant) window.ChatGateway.page = startPage(root);
  }

  window.ChatGateway = window.ChatGateway || {};
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
