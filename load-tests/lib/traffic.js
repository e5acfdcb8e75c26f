// Session-shaped traffic for impression-server, shared by every k6 script in this folder.
//
// One k6 iteration is one visit: a device arrives, gets a page of impressions, acts on some of
// them, sometimes retries a batch, and leaves with a beacon (`text/plain`, device id in the query
// string, as `navigator.sendBeacon` sends it). Each VU owns its own pool of devices, so one device
// never has two visits in flight at once, and a device picked again later is a returning visitor.
//
// Environment variables (all optional):
//   BASE_URL               server to test, default http://127.0.0.1:3004
//   VISITORS               distinct devices across all VUs, default 1000
//   IMPRESSIONS_PER_BATCH  impressions on the first page of a visit, default 5
//   THINK_MS               pause between the requests of a visit, in milliseconds, default 500
//   RETRY_PERCENT          share of visits that send their second batch twice, default 10
//   RECORD_ACKS            when 1, log every acknowledged item id as one JSON line

import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:3004').replace(/\/+$/, '');
const VISITORS = positiveInt('VISITORS', 1000);
const IMPRESSIONS_PER_BATCH = positiveInt('IMPRESSIONS_PER_BATCH', 5);
const THINK_SECONDS = nonNegativeInt('THINK_MS', 500) / 1000;
const RETRY_PERCENT = nonNegativeInt('RETRY_PERCENT', 10);
const RECORD_ACKS = __ENV.RECORD_ACKS === '1';

// Ids must be unique across runs against one server, so every run has its own prefix.
const RUN_ID = __ENV.RUN_ID || `${Date.now().toString(36)}`;
const FEATURES = ['RatingBox', 'Recommendations', 'SearchResults', 'Banner', 'Checkout'];
const EVENT_NAMES = ['Click', 'Rating', 'AddToCart', 'Dismiss'];

export const acceptedItems = new Counter('accepted_items');
export const duplicateItems = new Counter('duplicate_items');

// Per-VU state: the session key each device of this VU used last.
const sessionKeys = {};
let itemSequence = 0;

export function positiveInt(name, fallback) {
  const value = nonNegativeInt(name, fallback);
  if (value < 1) {
    throw new Error(`${name} must be at least 1, got ${__ENV[name]}`);
  }
  return value;
}

export function nonNegativeInt(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') {
    return fallback;
  }
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new Error(`${name} must be a whole number, got ${raw}`);
  }
  return value;
}

// Runs one visit of a device from this VU's pool; `maxVUs` sizes the pool.
export function visit(maxVUs) {
  const vu = exec.vu.idInTest;
  const poolSize = Math.max(1, Math.floor(VISITORS / Math.max(1, maxVUs)));
  const deviceId = `d-${RUN_ID}-${vu}-${Math.floor(Math.random() * poolSize)}`;

  // A returning visitor opens a new tab half of the time, which starts a new session.
  const returning = sessionKeys[deviceId] !== undefined;
  const sessionKey = returning && Math.random() < 0.5
    ? sessionKeys[deviceId]
    : `tab-${exec.scenario.iterationInTest}`;
  sessionKeys[deviceId] = sessionKey;

  const context = {
    entryUrl: `https://shop.example/p/${Math.floor(Math.random() * 500)}`,
    referrer: 'https://search.example/',
    userAgent: 'k6 load test',
    clientType: 'web',
  };
  const page = [];
  for (let i = 0; i < IMPRESSIONS_PER_BATCH; i += 1) {
    page.push(impression(`page-${i}`));
  }
  send(deviceId, {
    deviceId, sessionKey, sentAt: Date.now(), context, args: { userId: `u-${vu}`, plan: 'pro' },
    impressions: page, events: [],
  }, 'json');
  sleep(THINK_SECONDS);

  // The visitor acts on some impressions; the page may show one more thing in reply.
  const acted = page.filter(() => Math.random() < 0.4);
  const second = {
    deviceId, sessionKey, sentAt: Date.now(),
    impressions: [impression('reply')],
    events: acted.map((shown) => event(shown.impressionId)),
  };
  send(deviceId, second, 'header');
  if (Math.random() * 100 < RETRY_PERCENT) {
    // A client that timed out waiting for the response sends the same batch again.
    send(deviceId, second, 'header');
  }
  sleep(THINK_SECONDS);

  // The page is hidden: a beacon with the device id in the query string only.
  send(deviceId, {
    sessionKey, sentAt: Date.now(), impressions: [], events: [event(null, 'PageHidden')],
  }, 'beacon');
}

function impression(slot) {
  itemSequence += 1;
  return {
    impressionId: `i-${RUN_ID}-${exec.vu.idInTest}-${itemSequence}`,
    feature: FEATURES[itemSequence % FEATURES.length],
    time: Date.now(),
    args: { slot, product: `p-${Math.floor(Math.random() * 1000)}`, position: itemSequence % 10 },
    outputs: { callToAction: 'Rate it', score: Math.round(Math.random() * 100) / 100 },
    variants: [`cta-test:${itemSequence % 2 === 0 ? 'A' : 'B'}`],
  };
}

function event(impressionId, name) {
  itemSequence += 1;
  const item = {
    eventId: `e-${RUN_ID}-${exec.vu.idInTest}-${itemSequence}`,
    name: name || EVENT_NAMES[itemSequence % EVENT_NAMES.length],
    time: Date.now(),
    fields: { stars: 1 + (itemSequence % 5), source: 'k6' },
  };
  if (impressionId) {
    item.impressionId = impressionId;
  }
  return item;
}

// Sends one batch: `json` with the id in the body, `header` with X-Device-Id as well, or
// `beacon` as text/plain with the id only in the query string.
function send(deviceId, batch, style) {
  const body = JSON.stringify(batch);
  let url = `${BASE_URL}/v1/collect`;
  const headers = { 'Content-Type': 'application/json' };
  if (style === 'header') {
    headers['X-Device-Id'] = deviceId;
  } else if (style === 'beacon') {
    url += `?deviceId=${encodeURIComponent(deviceId)}`;
    headers['Content-Type'] = 'text/plain;charset=UTF-8';
  }
  const response = http.post(url, body, { headers, tags: { name: 'collect', style } });

  const items = batch.impressions.length + batch.events.length;
  let answer = null;
  if (response.status === 200) {
    try {
      answer = response.json();
    } catch (_) {
      answer = null;
    }
  }
  const counted = answer !== null && answer.accepted !== undefined
    && answer.accepted.impressions + answer.accepted.events + answer.duplicates === items;
  check(response, {
    'collect answered 200': (r) => r.status === 200,
    'collect counted every item': () => counted,
  });
  if (!counted) {
    return;
  }

  acceptedItems.add(answer.accepted.impressions + answer.accepted.events);
  duplicateItems.add(answer.duplicates);
  if (RECORD_ACKS) {
    console.log(JSON.stringify({
      ack: deviceId,
      sessionId: answer.sessionId,
      impressions: batch.impressions.map((item) => item.impressionId),
      events: batch.events.map((item) => item.eventId),
      accepted: answer.accepted,
      duplicates: answer.duplicates,
    }));
  }
}

// Returns a constant-arrival-rate scenario of `rate` visits a second for `duration`.
export function constantRate(rate, maxVUs, duration) {
  return {
    executor: 'constant-arrival-rate',
    rate,
    timeUnit: '1s',
    duration,
    preAllocatedVUs: Math.min(maxVUs, Math.max(1, rate * 2)),
    maxVUs,
    gracefulStop: '10s',
  };
}
