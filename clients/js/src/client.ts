import { randomId } from "./ids.js";
import { browserPlatform, type Platform, type RequestLike, type ResponseLike } from "./platform.js";
import { cookieStorage, loadOrCreate, type StorageLike } from "./storage.js";

/** JSON object of any values; the server stores each value as its JSON text. */
export type Fields = Record<string, unknown>;

/** Settings of a client. Only `endpoint` is required. */
export interface ClientOptions {
  /** Full URL of the collect endpoint, such as `https://collector.example/v1/collect`. */
  endpoint: string;
  /** Write key, sent as the `X-Write-Key` header on fetch and the `writeKey` query parameter on beacons. */
  writeKey?: string;
  /** Session arguments, such as a user id or plan, sent with every batch. */
  args?: Fields;
  /** The context's `clientType`. Default `"web"`. */
  clientType?: string;
  /** Time between sends of whatever is queued, in milliseconds. Default 5000. */
  flushIntervalMs?: number;
  /** Queued items that trigger a send at once, and the most items in one request. Default 50. */
  maxBatchItems?: number;
  /**
   * Largest body of a request sent with fetch, in bytes. Default 16000, so that one batch in
   * flight and the beacons of a closing page fit the browser's 64 KiB quota for requests that
   * outlive the page.
   */
  maxBatchBytes?: number;
  /** Largest body of one beacon, in bytes. Default 48000; browsers refuse beacons near 64 KiB. */
  maxBeaconBytes?: number;
  /** Most items kept while the server cannot be reached; the oldest are dropped beyond it. Default 5000. */
  maxQueueItems?: number;
  /** First delay before a failed send is retried, in milliseconds; it doubles per failure. Default 1000. */
  minRetryDelayMs?: number;
  /** Maximum delay between retries, in milliseconds, `Retry-After` included. Default 60000. */
  maxRetryDelayMs?: number;
  /** Time after which a request is aborted and retried, in milliseconds. Default 30000. */
  requestTimeoutMs?: number;
  /** Keys of the device id (localStorage or cookie) and session key (sessionStorage). */
  deviceIdKey?: string;
  sessionKeyKey?: string;
  /** The browser's APIs; tests pass fakes. Default: the current window's. */
  platform?: Platform;
}

/** Optional parts of an impression. */
export interface ImpressionDetails {
  args?: Fields;
  outputs?: Fields;
  variants?: string[];
}

/** Optional parts of an event. */
export interface EventDetails {
  /** Id of the impression the event belongs to, as returned by `impression()`. */
  impressionId?: string;
  fields?: Fields;
}

type Settings = Required<Omit<ClientOptions, "writeKey" | "args" | "platform">>;

const DEFAULTS: Omit<Settings, "endpoint"> = {
  clientType: "web",
  flushIntervalMs: 5000,
  maxBatchItems: 50,
  maxBatchBytes: 16000,
  maxBeaconBytes: 48000,
  maxQueueItems: 5000,
  minRetryDelayMs: 1000,
  maxRetryDelayMs: 60000,
  requestTimeoutMs: 30000,
  deviceIdKey: "impression-server.deviceId",
  sessionKeyKey: "impression-server.sessionKey",
};

/** Bytes of `,"impressions":[],"events":[]` added to the envelope of every body. */
const ITEM_ARRAYS_BYTES = 29;

/** An impression or event waiting to be sent, already serialized. */
interface QueuedItem {
  kind: "impression" | "event";
  json: string;
  bytes: number;
  /** Set while a request carrying the item has no response yet, so no other request carries it. */
  inFlight: boolean;
}

/** Result of one request. */
type Outcome = "stored" | "retry" | "rejected" | "too-large";

/**
 * Queues impressions and events for one device and tab and sends them to impression-server.
 *
 * Every item gets its id when it is recorded and keeps it across retries, and the server drops
 * an id it already has in the session, so a retry never stores an item twice. One request is in
 * flight at a time (beacons aside), and no item is in two pending requests at once.
 */
export class ImpressionClient {
  readonly deviceId: string;
  readonly sessionKey: string;

  private readonly settings: Settings;
  private readonly platform: Platform;
  private readonly writeKey?: string;
  private readonly envelope: Record<string, unknown>;
  private queue: QueuedItem[] = [];
  private sending: Promise<void> | undefined;
  private failures = 0;
  /** Time before which no regular request is sent, in milliseconds since the Unix epoch. */
  private retryAt = 0;
  /** `Retry-After` of the last retryable response, in milliseconds. */
  private retryAfterMs: number | undefined;
  private retryTimer: unknown;
  private intervalTimer: unknown;
  private removeListeners: () => void;
  private stopped = false;

  constructor(options: ClientOptions) {
    if (!options || typeof options.endpoint !== "string" || !options.endpoint) {
      throw new TypeError("impression-server client: the endpoint option is required");
    }
    const platform = options.platform || browserPlatform();
    if (!platform.fetch) {
      throw new TypeError("impression-server client: this browser has no fetch");
    }
    const settings: Settings = { ...DEFAULTS, endpoint: options.endpoint };
    for (const key of Object.keys(DEFAULTS) as Array<keyof typeof DEFAULTS>) {
      if (options[key] !== undefined) {
        (settings as unknown as Record<string, unknown>)[key] = options[key];
      }
    }
    this.settings = settings;
    this.platform = platform;
    this.writeKey = options.writeKey;

    const newId = () => randomId(platform.crypto, platform.random);
    const cookies = platform.cookies;
    const cookieJar = (): StorageLike | undefined => cookies && cookieStorage(cookies);
    this.deviceId = loadOrCreate(settings.deviceIdKey, [platform.localStorage, cookieJar], newId);
    this.sessionKey = loadOrCreate(settings.sessionKeyKey, [platform.sessionStorage], newId);

    const page = platform.page;
    this.envelope = {
      deviceId: this.deviceId,
      sessionKey: this.sessionKey,
      context: {
        entryUrl: page.url || undefined,
        referrer: page.referrer || undefined,
        userAgent: page.userAgent || undefined,
        clientType: settings.clientType,
      },
      args: options.args,
    };

    this.removeListeners = platform.onPageHide(() => this.sendOnPageHide());
    this.scheduleInterval();
  }

  /** Records that `feature` was shown, and returns the new impression's id for its events. */
  impression(feature: string, details: ImpressionDetails = {}): string {
    requireName("feature", feature);
    const impressionId = this.newId();
    this.enqueue("impression", {
      impressionId,
      feature,
      time: this.platform.now(),
      args: details.args,
      outputs: details.outputs,
      variants: details.variants,
    });
    return impressionId;
  }

  /** Records an event named `name`, and returns its id. */
  event(name: string, details: EventDetails = {}): string {
    requireName("name", name);
    const eventId = this.newId();
    this.enqueue("event", {
      eventId,
      name,
      time: this.platform.now(),
      impressionId: details.impressionId,
      fields: details.fields,
    });
    return eventId;
  }

  /**
   * Sends every queued item now, waiting for no retry delay, and resolves when the queue is
   * empty or a request failed (the items then stay queued for the next retry).
   */
  flush(): Promise<void> {
    this.retryAt = 0;
    return this.startSending();
  }

  /** Number of items recorded and not yet stored by the server, in flight included. */
  get pending(): number {
    return this.queue.length;
  }

  /** Stops timers and page listeners. Queued items are not sent; call `flush()` first. */
  stop(): void {
    this.stopped = true;
    this.removeListeners();
    this.platform.clearTimeout(this.intervalTimer);
    this.platform.clearTimeout(this.retryTimer);
  }

  private newId(): string {
    return randomId(this.platform.crypto, this.platform.random);
  }

  private enqueue(kind: QueuedItem["kind"], item: Record<string, unknown>): void {
    const json = JSON.stringify(item);
    const bytes = utf8Length(json);
    const limit = this.settings.maxBatchBytes - this.envelopeBytes();
    if (bytes + 1 > limit) {
      this.platform.warn(
        `impression-server client: dropped a ${kind} of ${bytes} bytes, larger than a request ` +
          `may carry (maxBatchBytes ${this.settings.maxBatchBytes})`,
      );
      return;
    }

    this.queue.push({ kind, json, bytes, inFlight: false });
    this.trimQueue();
    if (this.unsentCount() >= this.settings.maxBatchItems) {
      void this.startSending();
    }
  }

  /** Drops the oldest unsent items beyond `maxQueueItems`, which only a long outage reaches. */
  private trimQueue(): void {
    let excess = this.queue.length - this.settings.maxQueueItems;
    if (excess <= 0) {
      return;
    }
    const dropped = excess;
    this.queue = this.queue.filter((item) => item.inFlight || excess-- <= 0);
    this.platform.warn(
      `impression-server client: dropped ${dropped} unsent items, the queue is full ` +
        `(maxQueueItems ${this.settings.maxQueueItems})`,
    );
  }

  private unsentCount(): number {
    let count = 0;
    for (const item of this.queue) {
      if (!item.inFlight) {
        count++;
      }
    }
    return count;
  }

  private scheduleInterval(): void {
    this.intervalTimer = this.platform.setTimeout(() => {
      if (this.stopped) {
        return;
      }
      void this.startSending();
      this.scheduleInterval();
    }, this.settings.flushIntervalMs);
  }

  private startSending(): Promise<void> {
    if (!this.sending) {
      this.sending = this.sendQueued().finally(() => {
        this.sending = undefined;
      });
    }
    return this.sending;
  }

  /** Sends batches one at a time until the queue is empty, a request fails or a retry is due. */
  private async sendQueued(): Promise<void> {
    let maxItems = this.settings.maxBatchItems;
    // Each round either removes at least one item from the queue, halves maxItems or returns,
    // so the loop ends; the bound is a second guard.
    for (let round = 0; round <= this.settings.maxQueueItems + 64; round++) {
      if (this.stopped || this.platform.now() < this.retryAt) {
        return;
      }
      const batch = this.takeBatch(maxItems, this.settings.maxBatchBytes);
      if (!batch) {
        return;
      }

      const outcome = await this.post(batch, true);
      if (outcome === "too-large" && batch.length > 1) {
        // The server's body limit is below maxBatchBytes: send the same items in halves.
        maxItems = Math.max(1, batch.length >> 1);
        release(batch);
        continue;
      }
      if (outcome === "retry") {
        release(batch);
        this.scheduleRetry();
        return;
      }
      this.remove(batch);
      this.failures = 0;
    }
  }

  /**
   * Posts `batch` with fetch and returns what became of it. `keepalive` lets the request
   * outlive the page, which the browser allows only for small bodies.
   */
  private async post(batch: QueuedItem[], regular: boolean): Promise<Outcome> {
    const body = this.body(batch);
    const headers: Record<string, string> = {};
    // A custom header makes the browser send a CORS preflight, which a closing page may not
    // outlive, so requests sent at page hide carry the key in the URL.
    if (this.writeKey && regular) {
      headers["X-Write-Key"] = this.writeKey;
    }
    const request: RequestLike = {
      method: "POST",
      body,
      headers,
      keepalive: utf8Length(body) <= this.settings.maxBeaconBytes,
      credentials: "omit",
    };

    const controller = this.platform.abortController && this.platform.abortController();
    let timeout: unknown;
    if (controller) {
      request.signal = controller.signal;
      timeout = this.platform.setTimeout(() => controller.abort(), this.settings.requestTimeoutMs);
    }

    let response: ResponseLike;
    try {
      response = await this.platform.fetch!(this.url(!regular), request);
    } catch {
      // A network error, a CORS failure or the timeout: the server may or may not have stored
      // the batch, and resending the same ids is safe either way.
      return "retry";
    } finally {
      this.platform.clearTimeout(timeout);
    }
    return this.outcome(response, batch);
  }

  private async outcome(response: ResponseLike, batch: QueuedItem[]): Promise<Outcome> {
    const status = response.status;
    if (status >= 200 && status < 300) {
      return "stored";
    }
    if (status === 408 || status === 429 || status >= 500) {
      this.retryAfterMs = parseRetryAfter(response.headers.get("Retry-After"), this.platform.now());
      return "retry";
    }
    if (status === 413 && batch.length > 1) {
      return "too-large";
    }

    // The server rejects a batch whole and would reject the same bytes again, so a retry would
    // block the queue for good: the batch is dropped, and the warning shows why.
    let detail = "";
    try {
      detail = (await response.text()).slice(0, 500);
    } catch {
      // The body is only for the warning.
    }
    this.platform.warn(
      `impression-server client: dropped ${batch.length} items, the server rejected them ` +
        `with status ${status}: ${detail}`,
    );
    return "rejected";
  }

  /**
   * Waits before the next send: the backoff doubles with each failure from `minRetryDelayMs`
   * up to `maxRetryDelayMs`, with random jitter, and is at least the server's `Retry-After`.
   */
  private scheduleRetry(): void {
    const { minRetryDelayMs, maxRetryDelayMs } = this.settings;
    this.failures++;
    const backoff = Math.min(maxRetryDelayMs, minRetryDelayMs * 2 ** Math.min(this.failures - 1, 30));
    let delay = backoff / 2 + (backoff / 2) * this.platform.random();
    if (this.retryAfterMs !== undefined) {
      delay = Math.max(delay, Math.min(this.retryAfterMs, maxRetryDelayMs));
      this.retryAfterMs = undefined;
    }

    this.retryAt = this.platform.now() + delay;
    this.platform.clearTimeout(this.retryTimer);
    this.retryTimer = this.platform.setTimeout(() => {
      void this.startSending();
    }, delay);
  }

  /**
   * Sends every unsent item with `navigator.sendBeacon`, which the browser delivers after the
   * page is gone, in bodies under `maxBeaconBytes`. Items in a regular request wait for its
   * response, because that request was sent with `keepalive` and outlives the page too.
   */
  private sendOnPageHide(): void {
    if (this.stopped) {
      return;
    }
    const sendBeacon = this.platform.sendBeacon;
    for (let round = 0; round < this.queue.length + 1; round++) {
      const batch = this.takeBatch(Infinity, this.settings.maxBeaconBytes);
      if (!batch) {
        return;
      }
      let queued = false;
      try {
        queued = !!sendBeacon && sendBeacon(this.url(true), this.body(batch));
      } catch {
        // Some browsers throw on a body over their limit; fetch below is the fallback.
      }
      if (queued) {
        // A beacon gets no response, so once the browser has queued it the items count as sent.
        this.remove(batch);
        continue;
      }

      // Without beacons, or over the browser's quota, fall back to a keepalive fetch. Its
      // response arrives only if the page lives on, and until then the items stay in flight.
      void this.post(batch, false).then((outcome) => {
        if (outcome === "stored" || outcome === "rejected") {
          this.remove(batch);
        } else {
          release(batch);
        }
      });
      // The quota is shared, so further beacons would be refused too.
      return;
    }
  }

  /** Marks and returns the oldest unsent items that fit in one body, or undefined if none. */
  private takeBatch(maxItems: number, maxBytes: number): QueuedItem[] | undefined {
    const batch: QueuedItem[] = [];
    let bytes = this.envelopeBytes();
    for (const item of this.queue) {
      if (item.inFlight) {
        continue;
      }
      if (batch.length >= maxItems || (batch.length > 0 && bytes + item.bytes + 1 > maxBytes)) {
        break;
      }
      bytes += item.bytes + 1;
      batch.push(item);
    }
    for (const item of batch) {
      item.inFlight = true;
    }
    return batch.length > 0 ? batch : undefined;
  }

  private remove(batch: QueuedItem[]): void {
    const sent = new Set(batch);
    this.queue = this.queue.filter((item) => !sent.has(item));
  }

  private envelopeBytes(): number {
    return utf8Length(JSON.stringify({ ...this.envelope, sentAt: this.platform.now() })) + ITEM_ARRAYS_BYTES;
  }

  /** Builds the request body from the items' stored JSON, with `sentAt` set to now. */
  private body(batch: QueuedItem[]): string {
    const envelope = JSON.stringify({ ...this.envelope, sentAt: this.platform.now() });
    const impressions: string[] = [];
    const events: string[] = [];
    for (const item of batch) {
      (item.kind === "impression" ? impressions : events).push(item.json);
    }
    return `${envelope.slice(0, -1)},"impressions":[${impressions.join(",")}],"events":[${events.join(",")}]}`;
  }

  /**
   * Returns the endpoint URL with the device id, which lets a load balancer route by it, and,
   * when `withWriteKey` is set, the write key (beacons cannot send headers).
   */
  private url(withWriteKey: boolean): string {
    let query = `deviceId=${encodeURIComponent(this.deviceId)}`;
    if (withWriteKey && this.writeKey) {
      query += `&writeKey=${encodeURIComponent(this.writeKey)}`;
    }
    const endpoint = this.settings.endpoint;
    return endpoint + (endpoint.indexOf("?") >= 0 ? "&" : "?") + query;
  }
}

/** Creates a client; see `ClientOptions`. */
export function createClient(options: ClientOptions): ImpressionClient {
  return new ImpressionClient(options);
}

function requireName(field: string, value: unknown): void {
  if (typeof value !== "string" || value.length === 0) {
    throw new TypeError(`impression-server client: ${field} must be a non-empty string`);
  }
}

function release(batch: QueuedItem[]): void {
  for (const item of batch) {
    item.inFlight = false;
  }
}

/** Parses `Retry-After` (seconds or an HTTP date) into milliseconds from `now`. */
export function parseRetryAfter(value: string | null, now: number): number | undefined {
  if (!value) {
    return undefined;
  }
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) {
    return Number(trimmed) * 1000;
  }
  // An HTTP date names its weekday and month; Date.parse would also take "-1" as a year.
  const date = /[a-z]/i.test(trimmed) ? Date.parse(trimmed) : NaN;
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

function utf8Length(text: string): number {
  let bytes = text.length;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code >= 0xd800 && code <= 0xdbff) {
      // A surrogate pair is 4 bytes in UTF-8 and 2 UTF-16 units here.
      bytes += 2;
      i++;
    } else if (code >= 0x800) {
      bytes += 2;
    } else if (code >= 0x80) {
      bytes += 1;
    }
  }
  return bytes;
}
