import assert from "node:assert/strict";
import { test } from "node:test";

import { createClient } from "../dist/index.js";
import { randomId } from "../dist/ids.js";
import { FakeCookieJar, FakeStorage, fakeBrowser } from "./fakes.mjs";

const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const ENDPOINT = "http://127.0.0.1:3004/v1/collect";

test("device id persists in localStorage", () => {
  const browser = fakeBrowser();
  const first = createClient({ endpoint: ENDPOINT, platform: browser.platform });
  first.stop();
  const second = createClient({ endpoint: ENDPOINT, platform: browser.platform });
  second.stop();

  assert.match(first.deviceId, UUID_V4);
  assert.equal(second.deviceId, first.deviceId);
  assert.equal(browser.local.getItem("impression-server.deviceId"), first.deviceId);
  assert.equal(browser.cookies.written.length, 0, "no cookie while localStorage works");
});

test("session key is per tab", () => {
  const browser = fakeBrowser();
  const first = createClient({ endpoint: ENDPOINT, platform: browser.platform });
  first.stop();
  const sameTab = createClient({ endpoint: ENDPOINT, platform: browser.platform });
  sameTab.stop();
  const otherTab = createClient({
    endpoint: ENDPOINT,
    platform: { ...browser.platform, sessionStorage: () => new FakeStorage() },
  });
  otherTab.stop();

  assert.equal(browser.session.getItem("impression-server.sessionKey"), first.sessionKey);
  assert.equal(sameTab.sessionKey, first.sessionKey);
  assert.notEqual(otherTab.sessionKey, first.sessionKey);
  assert.equal(otherTab.deviceId, first.deviceId, "tabs share the device id");
  assert.notEqual(first.sessionKey, first.deviceId);
});

test("device id falls back to a cookie", () => {
  const cookies = new FakeCookieJar();
  const broken = new FakeStorage({ broken: true });
  const options = (platform) => ({ endpoint: ENDPOINT, platform });
  const first = fakeBrowser({ localStorage: () => broken, cookies });
  const client = createClient(options(first.platform));
  client.stop();

  assert.equal(cookies.written.length, 1);
  assert.match(cookies.written[0], /^impression-server\.deviceId=[0-9a-f-]{36}; max-age=34560000; path=\/; SameSite=Lax$/);

  const second = fakeBrowser({
    localStorage: () => {
      throw new DOMException("denied", "SecurityError");
    },
    cookies,
  });
  const again = createClient(options(second.platform));
  again.stop();
  assert.equal(again.deviceId, client.deviceId);
});

test("device id lives in memory without storage", () => {
  const browser = fakeBrowser({
    localStorage: () => null,
    sessionStorage: () => new FakeStorage({ broken: true }),
    cookies: new FakeCookieJar({ blocked: true }),
  });
  const client = createClient({ endpoint: ENDPOINT, platform: browser.platform });
  client.stop();

  assert.match(client.deviceId, /^[0-9a-f-]{36}$/);
  assert.match(client.sessionKey, /^[0-9a-f-]{36}$/);
  assert.notEqual(client.deviceId, client.sessionKey);
});

test("randomId without randomUUID", () => {
  let calls = 0;
  const viaRandomValues = randomId(
    {
      getRandomValues: (bytes) => {
        calls++;
        bytes.fill(0xff);
        return bytes;
      },
    },
    () => assert.fail("Math.random is not needed"),
  );
  assert.equal(calls, 1);
  assert.equal(viaRandomValues, "ffffffff-ffff-4fff-bfff-ffffffffffff");

  const ids = new Set();
  for (let i = 0; i < 100; i++) {
    const id = randomId(undefined, Math.random);
    assert.match(id, UUID_V4);
    ids.add(id);
  }
  assert.equal(ids.size, 100);
  assert.equal(randomId({ randomUUID: () => "from-crypto" }, Math.random), "from-crypto");
});

test("options and names are checked", () => {
  const browser = fakeBrowser();
  assert.throws(() => createClient({ platform: browser.platform }), TypeError);
  assert.throws(() => createClient({ endpoint: "", platform: browser.platform }), TypeError);
  assert.throws(
    () => createClient({ endpoint: ENDPOINT, platform: { ...browser.platform, fetch: undefined } }),
    /no fetch/,
  );

  const client = createClient({ endpoint: ENDPOINT, platform: browser.platform });
  assert.throws(() => client.impression(""), /feature must be a non-empty string/);
  assert.throws(() => client.impression(42), TypeError);
  assert.throws(() => client.event(""), /name must be a non-empty string/);
  assert.equal(client.pending, 0);
  client.stop();
});
