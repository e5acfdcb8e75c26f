import assert from "node:assert/strict";
import { test } from "node:test";

import { createClient } from "../dist/index.js";
import { fakeBrowser, itemIds, settle } from "./fakes.mjs";

const ENDPOINT = "http://127.0.0.1:3004/v1/collect";

function start(options = {}, overrides = {}) {
  const browser = fakeBrowser(overrides);
  const client = createClient({ endpoint: ENDPOINT, platform: browser.platform, ...options });
  return { ...browser, client };
}

test("hide sends queued items as a beacon", () => {
  const { client, net, hide } = start({ writeKey: "wk-1" });
  const impressionId = client.impression("Banner");
  const eventId = client.event("Click", { impressionId });
  hide();

  assert.equal(net.beacons.length, 1);
  const beacon = net.beacons[0];
  assert.equal(beacon.url.searchParams.get("deviceId"), client.deviceId);
  assert.equal(beacon.url.searchParams.get("writeKey"), "wk-1");
  assert.equal(beacon.body.deviceId, client.deviceId);
  assert.equal(beacon.body.sessionKey, client.sessionKey);
  assert.equal(typeof beacon.body.sentAt, "number");
  assert.deepEqual(itemIds(beacon.body), [impressionId, eventId]);
  assert.equal(client.pending, 0);
  assert.equal(net.requests.length, 0);

  hide();
  assert.equal(net.beacons.length, 1, "pagehide after visibilitychange sends nothing twice");
  client.stop();
});

test("beacons split under the byte cap", () => {
  const { client, net, hide } = start({ maxBeaconBytes: 5000, maxBatchItems: 1000 });
  const ids = [];
  for (let i = 0; i < 40; i++) {
    ids.push(client.event("View", { fields: { text: "é".repeat(200) } }));
  }
  hide();

  assert.ok(net.beacons.length > 1, `${net.beacons.length} beacons`);
  for (const beacon of net.beacons) {
    assert.ok(beacon.bytes <= 5000, `${beacon.bytes} bytes`);
  }
  assert.deepEqual(net.beacons.flatMap((beacon) => itemIds(beacon.body)), ids);
  assert.equal(client.pending, 0);
  client.stop();
});

test("items in flight stay out of beacons", async () => {
  const { client, net, hide } = start({ maxBatchItems: 2 });
  const inFlight = [client.event("a"), client.event("b")];
  await settle();
  assert.deepEqual(net.requests[0].ids, inFlight);

  const later = client.event("c");
  hide();
  assert.deepEqual(itemIds(net.beacons[0].body), [later]);
  assert.equal(client.pending, 2);

  // The page lived on and the request failed: its items are retried, and only once.
  net.requests[0].fail();
  await settle();
  hide();
  assert.equal(net.beacons.length, 2);
  assert.deepEqual(itemIds(net.beacons[1].body), inFlight);
  assert.equal(client.pending, 0);
  client.stop();
});

test("refused beacon falls back to keepalive fetch", async () => {
  const { client, net, hide } = start({ writeKey: "wk-1" });
  net.beaconResult = false;
  const id = client.event("Click");
  hide();
  await settle();

  assert.equal(net.beacons.length, 0);
  assert.equal(net.requests.length, 1);
  const request = net.requests[0];
  assert.equal(request.request.keepalive, true);
  assert.deepEqual(request.request.headers, {}, "no preflight from a closing page");
  assert.equal(request.url.searchParams.get("writeKey"), "wk-1");
  assert.deepEqual(request.ids, [id]);

  hide();
  assert.equal(net.requests.length, 1, "no second request while the first is unanswered");

  request.fail();
  await settle();
  assert.equal(client.pending, 1, "a failed fallback keeps the item");

  hide();
  await settle();
  assert.equal(net.requests.length, 2);
  net.requests[1].respond(200);
  await settle();
  assert.equal(client.pending, 0);
  client.stop();
});

test("missing or throwing sendBeacon uses fetch", async () => {
  for (const sendBeacon of [
    undefined,
    () => {
      throw new TypeError("beacon body too large");
    },
  ]) {
    const { client, net, hide } = start({}, { sendBeacon });
    const id = client.event("Click");
    hide();
    await settle();
    assert.equal(net.requests.length, 1);
    assert.deepEqual(net.requests[0].ids, [id]);
    net.requests[0].respond(200);
    await settle();
    assert.equal(client.pending, 0);
    client.stop();
  }
});

test("beacon during retry delay sends everything", async () => {
  const { client, clock, net, hide } = start();
  const first = client.event("a");
  await clock.advance(5000);
  net.requests[0].respond(503, { "Retry-After": "30" });
  await settle();
  const second = client.event("b");

  hide();
  assert.deepEqual(itemIds(net.beacons[0].body), [first, second]);
  await clock.advance(60_000);
  assert.equal(net.requests.length, 1, "nothing left to retry");
  client.stop();
});

test("hide with an empty queue sends nothing", () => {
  const { client, net, hide } = start();
  hide();
  assert.equal(net.beacons.length, 0);
  assert.equal(net.requests.length, 0);
  client.stop();
});
