/** The parts of the Web Storage API the client uses. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/** Reads and writes `document.cookie`. */
export interface CookieJar {
  read(): string;
  write(cookie: string): void;
}

/** Lifetime of the device id cookie: 400 days, the longest that Chromium keeps a cookie. */
const COOKIE_MAX_AGE_SECONDS = 400 * 24 * 3600;

/**
 * Returns the stored value of `key`, or stores and returns a new one from `create`.
 *
 * Tries each storage in order and keeps the value in the first one that accepts a write, so a
 * browser with storage blocked (some private modes, sandboxed frames) still gets an id. Returns
 * the new value unstored when every storage fails: it then lasts as long as the page.
 */
export function loadOrCreate(
  key: string,
  storages: Array<() => StorageLike | null | undefined>,
  create: () => string,
): string {
  for (const open of storages) {
    try {
      const storage = open();
      if (!storage) {
        continue;
      }
      const stored = storage.getItem(key);
      if (stored) {
        return stored;
      }
      const value = create();
      storage.setItem(key, value);
      return value;
    } catch {
      // Access is denied or the quota is full: try the next storage.
    }
  }
  return create();
}

/** Adapts a cookie jar to `StorageLike`, with first-party cookies that last 400 days. */
export function cookieStorage(jar: CookieJar): StorageLike {
  return {
    getItem(key) {
      const prefix = `${encodeURIComponent(key)}=`;
      for (const part of jar.read().split(";")) {
        const cookie = part.trim();
        if (cookie.startsWith(prefix)) {
          return decodeURIComponent(cookie.slice(prefix.length));
        }
      }
      return null;
    },
    setItem(key, value) {
      const cookie = `${encodeURIComponent(key)}=${encodeURIComponent(value)}`;
      jar.write(`${cookie}; max-age=${COOKIE_MAX_AGE_SECONDS}; path=/; SameSite=Lax`);
      // A browser that blocks cookies ignores the write without an error.
      if (this.getItem(key) !== value) {
        throw new Error("cookie not stored");
      }
    },
  };
}
