export { ImpressionClient, createClient, parseRetryAfter } from "./client.js";
export type { ClientOptions, EventDetails, Fields, ImpressionDetails } from "./client.js";
export type { Platform, RequestLike, ResponseLike } from "./platform.js";
export type { CookieJar, StorageLike } from "./storage.js";
export type { CryptoLike } from "./ids.js";
export { browserPlatform } from "./platform.js";
