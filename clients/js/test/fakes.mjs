// Fakes for the browser APIs the client uses: a manual clock with timers, a network whose
// requests the test responds to one by one, storages and a cookie jar.

/** Lets pending promise callbacks run. */
export async function settle() {
  for (let i = 0; i < 5; i++) {
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/** Timers that fire only when the test advances the clock. */
export class FakeClock {
  constructor(now) {
    this.now = now;
    this.timers = new Map();
    this.nextId = 1;
  }

  setTimeout = (callback, delayMs) => {
    const id = this.nextId++;
    this.timers.set(id, { at: this.now + Math.max(0, delayMs), callback });
    return id;
  };

  clearTimeout = (id) => {
    this.timers.delete(id);
  };

  /** Moves time forward by `ms`, firing due timers in order and settling promises after each. */
  async advance(ms) {
    const target = this.now + ms;
    for (let fired = 0; fired < 10_000; fired++) {
      let next;
      for (const [id, timer] of this.timers) {
        if (timer.at <= target && (!next || timer.at < next[1].at)) {
          next = [id, timer];
        }
      }
      if (!next) {
        break;
      }
      this.timers.delete(next[0]);
      this.now = next[1].at;
      next[1].callback();
      await settle();
    }
    this.now = target;
    await settle();
  }
}

/** A request the client sent with fetch, which the test responds to. */
class PendingRequest {
  constructor(url, request, resolve, reject) {
    this.url = new URL(url);
    this.request = request;
    this.body = JSON.parse(request.body);
    this.resolve = resolve;
    this.reject = reject;
    this.answered = false;
  }

  get ids() {
    return itemIds(this.body);
  }

  respond(status, headers = {}, text = "{}") {
    this.answered = true;
    const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
    this.resolve({
      status,
      headers: { get: (name) => lower[name.toLowerCase()] ?? null },
      text: async () => text,
    });
  }

  fail(message = "Failed to fetch") {
    this.answered = true;
    this.reject(new TypeError(message));
  }
}

/** Returns the impression and event ids of a request body. */
export function itemIds(body) {
  return [
    ...(body.impressions || []).map((item) => item.impressionId),
    ...(body.events || []).map((item) => item.eventId),
  ];
}

/** Records fetch requests and beacons. `autoStatus` responds to every request with that status. */
export class FakeNetwork {
  constructor() {
    this.requests = [];
    this.beacons = [];
    this.beaconResult = true;
    this.autoStatus = undefined;
  }

  fetch = (url, request) =>
    new Promise((resolve, reject) => {
      const pending = new PendingRequest(url, request, resolve, reject);
      this.requests.push(pending);
      if (request.signal) {
        request.signal.addEventListener("abort", () => pending.fail("aborted"));
      }
      if (this.autoStatus !== undefined) {
        pending.respond(this.autoStatus);
      }
    });

  sendBeacon = (url, body) => {
    const accepted = typeof this.beaconResult === "function" ? this.beaconResult(body) : this.beaconResult;
    if (accepted) {
      this.beacons.push({ url: new URL(url), body: JSON.parse(body), bytes: Buffer.byteLength(body) });
    }
    return accepted;
  };

  /** Requests without a response yet. */
  unanswered() {
    return this.requests.filter((request) => !request.answered);
  }
}

/** In-memory Web Storage; `broken` makes every call throw, as blocked storage does. */
export class FakeStorage {
  constructor({ broken = false } = {}) {
    this.items = new Map();
    this.broken = broken;
  }

  getItem(key) {
    if (this.broken) throw new DOMException("denied", "SecurityError");
    return this.items.has(key) ? this.items.get(key) : null;
  }

  setItem(key, value) {
    if (this.broken) throw new DOMException("denied", "SecurityError");
    this.items.set(key, String(value));
  }
}

/** `document.cookie` that keeps name=value pairs; `blocked` ignores writes, as browsers do. */
export class FakeCookieJar {
  constructor({ blocked = false } = {}) {
    this.cookies = new Map();
    this.blocked = blocked;
    this.written = [];
  }

  read() {
    return [...this.cookies].map(([name, value]) => `${name}=${value}`).join("; ");
  }

  write(cookie) {
    this.written.push(cookie);
    if (this.blocked) return;
    const [pair] = cookie.split(";");
    const index = pair.indexOf("=");
    this.cookies.set(pair.slice(0, index), pair.slice(index + 1));
  }
}

/** Returns a fake platform and its parts; `overrides` replaces platform members. */
export function fakeBrowser(overrides = {}) {
  const clock = new FakeClock(1_733_310_000_000);
  const net = new FakeNetwork();
  const local = new FakeStorage();
  const session = new FakeStorage();
  const cookies = new FakeCookieJar();
  const warnings = [];
  const hideListeners = new Set();
  let uuids = 0;
  const platform = {
    now: () => clock.now,
    random: () => 0.5,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    fetch: net.fetch,
    sendBeacon: net.sendBeacon,
    abortController: () => new AbortController(),
    crypto: { randomUUID: () => `00000000-0000-4000-8000-${String(++uuids).padStart(12, "0")}` },
    localStorage: () => local,
    sessionStorage: () => session,
    cookies,
    page: { url: "https://shop.example/p/42", referrer: "https://search.example/", userAgent: "FakeBrowser/1.0" },
    onPageHide(listener) {
      hideListeners.add(listener);
      return () => hideListeners.delete(listener);
    },
    warn: (message) => warnings.push(message),
    ...overrides,
  };
  const hide = () => {
    for (const listener of hideListeners) listener();
  };
  return { platform, clock, net, local, session, cookies, warnings, hide, hideListeners };
}
