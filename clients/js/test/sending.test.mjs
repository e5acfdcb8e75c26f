import assert from "node:assert/strict";
import { test } from "node:test";

import { createClient, parseRetryAfter } from "../dist/index.js";
import { fakeBrowser, settle } from "./fakes.mjs";

const ENDPOINT = "http://127.0.0.1:3004/v1/collect";

function start(options = {}, overrides = {}) {
  const browser = fakeBrowser(overrides);
  const client = createClient({ endpoint: ENDPOINT, platform: browser.platform, ...options });
  return { ...browser, client };
}

test("batch body has the documented shape", async () => {
  const { client, clock, net } = start({ args: { userId: "u-1" } });
  const impressionId = client.impression("RatingBox", {
    args: { product: "shoe-42" },
    outputs: { callToAction: "Rate it" },
    variants: ["cta-test:B"],
  });
  await clock.advance(1000);
  const eventId = client.event("Rating", { impressionId, fields: { stars: 5 } });
  await clock.advance(4000);

  assert.equal(net.requests.length, 1);
  const { url, request, body } = net.requests[0];
  assert.equal(url.origin + url.pathname, ENDPOINT);
  assert.equal(url.searchParams.get("deviceId"), client.deviceId);
  assert.equal(url.searchParams.has("writeKey"), false);
  assert.equal(request.method, "POST");
  assert.equal(request.keepalive, true);
  assert.equal(request.credentials, "omit");
  assert.deepEqual(request.headers, {}, "no header that would need a CORS preflight");

  assert.deepEqual(body, {
    deviceId: client.deviceId,
    sessionKey: client.sessionKey,
    sentAt: 1_733_310_005_000,
    context: {
      entryUrl: "https://shop.example/p/42",
      referrer: "https://search.example/",
      userAgent: "FakeBrowser/1.0",
      clientType: "web",
    },
    args: { userId: "u-1" },
    impressions: [
      {
        impressionId,
        feature: "RatingBox",
        time: 1_733_310_000_000,
        args: { product: "shoe-42" },
        outputs: { callToAction: "Rate it" },
        variants: ["cta-test:B"],
      },
    ],
    events: [{ eventId, name: "Rating", time: 1_733_310_001_000, impressionId, fields: { stars: 5 } }],
  });
  client.stop();
});

test("interval sends queued items", async () => {
  const { client, clock, net } = start({ flushIntervalMs: 2000 });
  await clock.advance(2000);
  assert.equal(net.requests.length, 0, "nothing to send");

  client.event("Scroll");
  await clock.advance(1999);
  assert.equal(net.requests.length, 0);
  await clock.advance(1);
  assert.equal(net.requests.length, 1);
  net.requests[0].respond(200);
  await settle();
  assert.equal(client.pending, 0);
  client.stop();
});

test("full queue sends without waiting", async () => {
  const { client, net } = start({ maxBatchItems: 3 });
  client.event("a");
  client.event("b");
  await settle();
  assert.equal(net.requests.length, 0);
  client.event("c");
  await settle();
  assert.equal(net.requests.length, 1);
  assert.equal(net.requests[0].body.events.length, 3);
  client.stop();
});

test("batches split by items and bytes", async () => {
  const { client, net } = start({ maxBatchItems: 4, maxBatchBytes: 2000, flushIntervalMs: 60_000 });
  net.autoStatus = 200;
  const padding = "x".repeat(300);
  const ids = [];
  for (let i = 0; i < 10; i++) {
    ids.push(client.impression("Card", { args: { padding } }));
  }
  await client.flush();

  assert.equal(client.pending, 0);
  const sent = net.requests.flatMap((request) => request.ids);
  assert.deepEqual(sent, ids, "every item once, in order");
  for (const request of net.requests) {
    assert.ok(request.ids.length <= 4, `${request.ids.length} items`);
    assert.ok(Buffer.byteLength(request.request.body) <= 2000, `${Buffer.byteLength(request.request.body)} bytes`);
  }
  assert.ok(net.requests.length >= 3);
  client.stop();
});

test("one request in flight at a time", async () => {
  const { client, clock, net } = start({ maxBatchItems: 2 });
  client.event("a");
  client.event("b");
  await settle();
  assert.equal(net.requests.length, 1);

  client.event("c");
  client.event("d");
  await clock.advance(5000);
  assert.equal(net.requests.length, 1, "the next batch waits for the answer");

  net.requests[0].respond(200);
  await settle();
  assert.equal(net.requests.length, 2);
  assert.deepEqual(
    net.requests[1].body.events.map((event) => event.name),
    ["c", "d"],
  );
  client.stop();
});

test("503 keeps items and honours Retry-After", async () => {
  const { client, clock, net } = start({ minRetryDelayMs: 1000 });
  const impressionId = client.impression("Banner");
  const eventId = client.event("Click", { impressionId });
  await clock.advance(5000);
  assert.equal(net.requests.length, 1);
  const firstBody = net.requests[0].body;
  net.requests[0].respond(503, { "Retry-After": "7" }, '{"error":"shutting_down"}');
  await settle();
  assert.equal(client.pending, 2);

  await clock.advance(6999);
  assert.equal(net.requests.length, 1, "no retry before Retry-After, interval ticks included");
  await clock.advance(1);
  assert.equal(net.requests.length, 2);
  const retry = net.requests[1].body;
  assert.deepEqual(net.requests[1].ids, [impressionId, eventId], "same ids");
  assert.deepEqual(retry.impressions, firstBody.impressions, "same items");
  assert.equal(retry.sentAt, firstBody.sentAt + 7000, "sentAt is the time of this attempt");

  net.requests[1].respond(200);
  await settle();
  assert.equal(client.pending, 0);
  client.stop();
});

test("network errors back off exponentially", async () => {
  // random() is 0.5, so each delay is 3/4 of the backoff: 750, 1500, 3000, then capped.
  const { client, clock, net, warnings } = start({ minRetryDelayMs: 1000, maxRetryDelayMs: 4000, flushIntervalMs: 100_000 });
  const id = client.event("Click");
  void client.flush();
  await settle();
  net.requests[0].fail();
  await settle();

  const expectedDelays = [750, 1500, 3000, 3000, 3000];
  for (const [attempt, delay] of expectedDelays.entries()) {
    await clock.advance(delay - 1);
    assert.equal(net.requests.length, attempt + 1, `attempt ${attempt + 2} waits ${delay} ms`);
    await clock.advance(1);
    assert.equal(net.requests.length, attempt + 2);
    assert.deepEqual(net.requests.at(-1).ids, [id]);
    net.requests.at(-1).fail();
    await settle();
  }

  await clock.advance(3000);
  net.requests.at(-1).respond(200);
  await settle();
  assert.equal(client.pending, 0);
  assert.deepEqual(warnings, [], "retries are silent");

  // A success resets the backoff.
  client.event("Again");
  void client.flush();
  await settle();
  net.requests.at(-1).fail();
  await settle();
  const count = net.requests.length;
  await clock.advance(750);
  assert.equal(net.requests.length, count + 1);
  client.stop();
});

test("retryable statuses keep items", async () => {
  for (const status of [408, 429, 500, 502, 503, 504]) {
    const { client, clock, net } = start();
    const id = client.event("Click");
    void client.flush();
    await settle();
    net.requests[0].respond(status);
    await settle();
    assert.equal(client.pending, 1, `status ${status}`);
    await clock.advance(60_000);
    assert.deepEqual(net.requests[1].ids, [id], `status ${status} is retried`);
    client.stop();
  }
});

test("400 drops the batch with a warning", async () => {
  const { client, net, warnings } = start({ maxBatchItems: 2 });
  net.autoStatus = undefined;
  client.event("bad-1");
  client.event("bad-2");
  await settle();
  const rejection = '{"error":"invalid_field","field":"events[0].name","message":"must not be empty"}';
  net.requests[0].respond(400, {}, rejection);
  await settle();

  assert.equal(client.pending, 0);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /dropped 2 items, the server rejected them with status 400/);
  assert.ok(warnings[0].includes("events[0].name"), warnings[0]);

  client.event("good");
  void client.flush();
  await settle();
  assert.equal(net.requests.length, 2, "the queue moves on");
  client.stop();
});

test("413 splits the batch then drops", async () => {
  const { client, net, warnings } = start({ flushIntervalMs: 100_000 });
  const ids = [client.event("a"), client.event("b"), client.event("c"), client.event("d")];
  const done = client.flush();
  await settle();

  // The server takes at most 2 items, and rejects "c" alone as too large.
  for (let round = 0; round < 10 && net.unanswered().length > 0; round++) {
    const request = net.unanswered()[0];
    const tooLarge = request.ids.length > 2 || request.ids.includes(ids[2]);
    request.respond(tooLarge ? 413 : 200);
    await settle();
  }
  await done;

  assert.deepEqual(
    net.requests.map((request) => request.ids.length),
    [4, 2, 2, 1, 1],
  );
  assert.deepEqual(net.requests[2].ids, ids.slice(2));
  assert.deepEqual(net.requests[4].ids, [ids[3]]);
  assert.deepEqual(net.requests[1].ids, ids.slice(0, 2));
  assert.equal(client.pending, 0);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /dropped 1 items, the server rejected them with status 413/);
  client.stop();
});

test("write key goes in a header", async () => {
  const { client, net } = start({ writeKey: "wk-1" });
  net.autoStatus = 200;
  client.event("Click");
  await client.flush();
  assert.deepEqual(net.requests[0].request.headers, { "X-Write-Key": "wk-1" });
  assert.equal(net.requests[0].url.searchParams.has("writeKey"), false);
  client.stop();
});

test("endpoint with a query keeps it", async () => {
  const { client, net } = start({ endpoint: `${ENDPOINT}?tenant=a b` });
  net.autoStatus = 200;
  client.event("Click");
  await client.flush();
  const url = net.requests[0].url;
  assert.equal(url.searchParams.get("tenant"), "a b");
  assert.equal(url.searchParams.get("deviceId"), client.deviceId);
  client.stop();
});

test("hung request times out and retries", async () => {
  const { client, clock, net } = start({ requestTimeoutMs: 10_000, flushIntervalMs: 100_000 });
  const id = client.event("Click");
  void client.flush();
  await settle();
  await clock.advance(9_999);
  assert.equal(net.requests[0].answered, false);
  await clock.advance(1);
  assert.equal(net.requests[0].answered, true, "aborted");
  assert.equal(client.pending, 1);

  await clock.advance(1000);
  assert.equal(net.requests.length, 2);
  assert.deepEqual(net.requests[1].ids, [id]);
  client.stop();
});

test("outage keeps items until the queue is full", async () => {
  const { client, clock, net, warnings } = start({ maxQueueItems: 5, maxBatchItems: 50 });
  net.autoStatus = 503;
  const ids = [];
  for (let i = 0; i < 8; i++) {
    ids.push(client.event(`e${i}`));
    await clock.advance(2000);
  }
  assert.equal(client.pending, 5);
  assert.ok(warnings.every((warning) => /queue is full \(maxQueueItems 5\)/.test(warning)), warnings.join("\n"));
  assert.ok(warnings.length >= 1);

  net.autoStatus = 200;
  await client.flush();
  const stored = net.requests.at(-1).ids;
  assert.deepEqual(stored, ids.slice(3), "the newest items are kept");
  assert.equal(client.pending, 0);
  client.stop();
});

test("oversized item is dropped with a warning", async () => {
  const { client, net, warnings } = start({ maxBatchBytes: 4000 });
  const id = client.impression("Huge", { args: { blob: "x".repeat(5000) } });
  assert.match(id, /^[0-9a-f-]{36}$/);
  assert.equal(client.pending, 0);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /dropped a impression of \d+ bytes/);
  await client.flush();
  assert.equal(net.requests.length, 0);
  client.stop();
});

test("stop ends timers and listeners", async () => {
  const { client, clock, net, hideListeners } = start();
  client.event("Click");
  client.stop();
  assert.equal(hideListeners.size, 0);
  await clock.advance(60_000);
  assert.equal(net.requests.length, 0);
  assert.equal(clock.timers.size, 0);
});

test("parseRetryAfter reads seconds and dates", () => {
  const now = Date.parse("2026-12-04T10:00:00Z");
  assert.equal(parseRetryAfter("5", now), 5000);
  assert.equal(parseRetryAfter(" 0 ", now), 0);
  assert.equal(parseRetryAfter("Fri, 04 Dec 2026 10:00:30 GMT", now), 30_000);
  assert.equal(parseRetryAfter("Fri, 04 Dec 2026 09:00:00 GMT", now), 0);
  assert.equal(parseRetryAfter(null, now), undefined);
  assert.equal(parseRetryAfter("", now), undefined);
  assert.equal(parseRetryAfter("soon", now), undefined);
  assert.equal(parseRetryAfter("-1", now), undefined);
});
