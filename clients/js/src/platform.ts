import type { CryptoLike } from "./ids.js";
import type { CookieJar, StorageLike } from "./storage.js";

/** The parts of a fetch `Response` the client reads. */
export interface ResponseLike {
  status: number;
  headers: { get(name: string): string | null };
  text(): Promise<string>;
}

/** The options of a fetch request the client sets. */
export interface RequestLike {
  method: "POST";
  body: string;
  headers: Record<string, string>;
  keepalive: boolean;
  credentials: "omit";
  signal?: AbortSignal;
}

/**
 * Everything the client takes from the browser. `browserPlatform` supplies the real one; tests
 * pass fakes.
 */
export interface Platform {
  /** Milliseconds since the Unix epoch. */
  now(): number;
  random(): number;
  setTimeout(callback: () => void, delayMs: number): unknown;
  clearTimeout(handle: unknown): void;
  fetch?: (url: string, request: RequestLike) => Promise<ResponseLike>;
  /** `navigator.sendBeacon`; returns false when the browser did not queue the body. */
  sendBeacon?: (url: string, body: string) => boolean;
  /** Creates an `AbortController`, where the browser has one, to time out a request. */
  abortController?: () => AbortController;
  crypto?: CryptoLike;
  /** Each accessor may throw, as `window.localStorage` does when storage is blocked. */
  localStorage: () => StorageLike | null | undefined;
  sessionStorage: () => StorageLike | null | undefined;
  cookies?: CookieJar;
  /** The page's URL, referrer and user agent, sent as the session's context. */
  page: { url?: string; referrer?: string; userAgent?: string };
  /**
   * Calls `listener` when the page is hidden (`visibilitychange` to hidden) or unloaded
   * (`pagehide`). Returns a function that removes the listeners.
   */
  onPageHide(listener: () => void): () => void;
  /** Prints a warning; `console.warn` in a browser. */
  warn(message: string): void;
}

/** Returns the platform of the current browser window. */
export function browserPlatform(): Platform {
  const g = globalThis as typeof globalThis & Partial<Window>;
  const nav = typeof navigator === "undefined" ? undefined : navigator;
  const doc = typeof document === "undefined" ? undefined : document;
  return {
    now: () => Date.now(),
    random: () => Math.random(),
    setTimeout: (callback, delayMs) => setTimeout(callback, delayMs),
    clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
    fetch: typeof fetch === "function" ? (url, request) => fetch(url, request) : undefined,
    sendBeacon:
      nav && typeof nav.sendBeacon === "function"
        ? (url, body) => nav.sendBeacon(url, body)
        : undefined,
    abortController:
      typeof AbortController === "function" ? () => new AbortController() : undefined,
    crypto: typeof crypto === "undefined" ? undefined : crypto,
    localStorage: () => g.localStorage,
    sessionStorage: () => g.sessionStorage,
    cookies: doc && {
      read: () => doc.cookie,
      write: (cookie) => {
        doc.cookie = cookie;
      },
    },
    page: {
      url: g.location && g.location.href,
      referrer: doc && doc.referrer,
      userAgent: nav && nav.userAgent,
    },
    onPageHide(listener) {
      if (!doc || typeof g.addEventListener !== "function") {
        return () => {};
      }
      const onVisibilityChange = () => {
        if (doc.visibilityState === "hidden") {
          listener();
        }
      };
      doc.addEventListener("visibilitychange", onVisibilityChange);
      g.addEventListener("pagehide", listener);
      return () => {
        doc.removeEventListener("visibilitychange", onVisibilityChange);
        g.removeEventListener("pagehide", listener);
      };
    },
    warn: (message) => console.warn(message),
  };
}
