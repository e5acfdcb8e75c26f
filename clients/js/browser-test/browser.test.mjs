// End-to-end test in headless Chromium: a page on one origin records impressions and events
// with the built client and sends them to the real impression-server on another origin, by
// fetch while it is open and by sendBeacon as it closes. After SIGINT, every recorded id must
// be in the server's Avro output exactly once, in a session of the page's device.
//
// Needs `npm run build`, the server binary (`cargo build` in the repository root, or
// IMPRESSION_SERVER_BIN), Chromium (CHROMIUM, default /usr/bin/chromium) and python3 with
// tests/support/requirements.txt.

import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const REPO_DIR = resolve(PACKAGE_DIR, "../..");
const SERVER_BIN = process.env.IMPRESSION_SERVER_BIN || join(REPO_DIR, "target/debug/impression-server");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const START_TIMEOUT_MS = 30_000;
const STEP_TIMEOUT_MS = 20_000;
const EXIT_TIMEOUT_MS = 30_000;
/** Time for the beacons of closed pages to reach the server before the browser exits. */
const BEACON_GRACE_MS = 3_000;

/** Rejects with a message naming `step` when `promise` takes longer than `ms`. */
function within(ms, step, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${step}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

/** Starts the server on 127.0.0.1 and resolves with the process and its address. */
function startServer(output) {
  assert.ok(existsSync(SERVER_BIN), `${SERVER_BIN} not found: run cargo build in the repository root or set IMPRESSION_SERVER_BIN`);
  const child = spawn(
    SERVER_BIN,
    ["--listen", "127.0.0.1:0", "--output", output, "--server-id", "browser-test"],
    { env: { ...process.env, RUST_LOG: "info", NO_COLOR: "1" }, stdio: ["ignore", "ignore", "pipe"] },
  );
  const server = { child, log: "", exit: undefined };
  server.exited = new Promise((done) => {
    child.on("exit", (code, signal) => {
      server.exit = { code, signal };
      done(server.exit);
    });
  });
  const listening = new Promise((done, fail) => {
    child.on("error", fail);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      server.log += chunk;
      // Strip colour codes before matching, in case the log is coloured.
      const match = server.log.replace(/\x1b\[[0-9;]*m/g, "").match(/listening.*addr=(\S+)/);
      if (match) done(match[1]);
    });
    server.exited.then((exit) => fail(new Error(`server exited before listening: ${JSON.stringify(exit)}\n${server.log}`)));
  });
  return within(START_TIMEOUT_MS, "server start", listening).then((addr) => {
    server.url = `http://${addr}`;
    return server;
  });
}

/** Serves the test page and the built client on 127.0.0.1, another origin than the server. */
function startPageServer() {
  const files = {
    "/page.html": ["text/html", join(PACKAGE_DIR, "browser-test/page.html")],
  };
  const http = createServer((request, response) => {
    const path = new URL(request.url, "http://page").pathname;
    let file = files[path];
    if (!file && /^\/dist\/[a-z]+\.js$/.test(path)) {
      file = ["text/javascript", join(PACKAGE_DIR, path)];
    }
    if (!file || !existsSync(file[1])) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "Content-Type": file[0] }).end(readFileSync(file[1]));
  });
  return new Promise((done) => {
    http.listen(0, "127.0.0.1", () => done(http));
  });
}

/** Reads the output with fastavro and returns every session record. */
function readSessions(output) {
  const script = join(REPO_DIR, "tests/support/read_avro.py");
  return new Promise((done, fail) => {
    execFile("python3", [script, output], { timeout: 60_000, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) {
        fail(new Error(`read_avro.py failed (pip install -r tests/support/requirements.txt): ${error.message}\n${stderr}`));
        return;
      }
      done(JSON.parse(stdout).flatMap((file) => file.records));
    });
  });
}

/** Opens the page, waits for the client to start, and returns the page. */
async function openPage(context, pageUrl) {
  const page = await context.newPage();
  await within(STEP_TIMEOUT_MS, "page load", page.goto(pageUrl));
  await within(STEP_TIMEOUT_MS, "client start", page.waitForFunction(() => window.ready === true));
  return page;
}

test("browser client delivers every item once", { timeout: 180_000 }, async (t) => {
  const output = mkdtempSync(join(tmpdir(), "impression-client-"));
  t.after(() => rmSync(output, { recursive: true, force: true }));

  const server = await startServer(output);
  t.after(() => {
    if (!server.exit) server.child.kill("SIGKILL");
  });
  const pages = await startPageServer();
  t.after(() => pages.close());
  const pageUrl = `http://127.0.0.1:${pages.address().port}/page.html?collector=${encodeURIComponent(server.url)}`;

  const browser = await within(START_TIMEOUT_MS, "Chromium start", chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS }));
  t.after(() => browser.close());
  const context = await browser.newContext();

  // Every POST to the collector, with how the page sent it and the status it got.
  const posts = [];
  context.on("requestfinished", async (request) => {
    if (!request.url().startsWith(server.url) || request.method() !== "POST") return;
    const response = await request.response().catch(() => null);
    posts.push({ type: request.resourceType(), status: response && response.status() });
  });

  // First page: enough clicks to fill batches of 3, sent by fetch, then a few left for the
  // beacon that goes out as the page closes.
  const first = await openPage(context, pageUrl);
  for (let i = 0; i < 4; i++) {
    await first.click("#rate");
    await first.click("#buy");
  }
  await within(STEP_TIMEOUT_MS, "fetch sends", first.waitForFunction(() => window.client.pending < 3));
  await first.click("#rate");
  const firstRecorded = await first.evaluate(() => window.recorded);
  await within(STEP_TIMEOUT_MS, "first page close", first.close({ runBeforeUnload: true }));

  // Second page, same browser profile: the same device in a new tab, closed at once.
  const second = await openPage(context, pageUrl);
  await second.click("#buy");
  const secondRecorded = await second.evaluate(() => window.recorded);
  await within(STEP_TIMEOUT_MS, "second page close", second.close({ runBeforeUnload: true }));

  await sleep(BEACON_GRACE_MS);
  await within(STEP_TIMEOUT_MS, "browser close", browser.close());

  server.child.kill("SIGINT");
  const exit = await within(EXIT_TIMEOUT_MS, "server exit after SIGINT", server.exited);
  assert.deepEqual(exit, { code: 0, signal: null }, server.log);

  assert.equal(firstRecorded.ids.length, 11);
  assert.equal(secondRecorded.ids.length, 3);
  assert.equal(secondRecorded.deviceId, firstRecorded.deviceId, "localStorage keeps the device id");
  assert.notEqual(secondRecorded.sessionKey, firstRecorded.sessionKey, "each tab has its own session key");
  assert.ok(posts.some((post) => post.type === "fetch" && post.status === 200), JSON.stringify(posts));

  const sessions = await readSessions(output);
  const found = new Map();
  for (const session of sessions) {
    for (const item of session.impressions) {
      found.set(item.impression_id, [...(found.get(item.impression_id) || []), session]);
    }
    for (const item of session.events) {
      found.set(item.event_id, [...(found.get(item.event_id) || []), session]);
    }
  }
  for (const recorded of [firstRecorded, secondRecorded]) {
    for (const id of recorded.ids) {
      const holders = found.get(id) || [];
      assert.equal(holders.length, 1, `item ${id} is stored ${holders.length} times`);
      assert.equal(holders[0].device_id, recorded.deviceId, `item ${id} is in a session of its device`);
      assert.equal(holders[0].session_key, recorded.sessionKey, `item ${id} is in its tab's session`);
    }
  }
  assert.equal(found.size, firstRecorded.ids.length + secondRecorded.ids.length, "nothing else was stored");

  const firstSession = sessions.find((session) => session.session_key === firstRecorded.sessionKey);
  assert.equal(firstSession.entry_url, pageUrl);
  assert.equal(firstSession.client_type, "web");
  assert.equal(firstSession.args.plan, "pro");
});
