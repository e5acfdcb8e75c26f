// Smoke test: a few visitors for a few seconds, plus the rejections a client can cause.
// Any failed check or request fails the run.
//
//   k6 run load-tests/smoke.js
//   BASE_URL=http://127.0.0.1:3004 VUS=2 DURATION=10s k6 run load-tests/smoke.js

import http from 'k6/http';
import { check } from 'k6';
import { BASE_URL, positiveInt, visit } from './lib/traffic.js';

const VUS = positiveInt('VUS', 2);

export const options = {
  scenarios: {
    visits: {
      executor: 'constant-vus',
      vus: VUS,
      duration: __ENV.DURATION || '10s',
      gracefulStop: '10s',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
    'http_req_duration{name:collect}': [`p(99)<${__ENV.P99_MS || 500}`],
  },
};

// Checks the operations endpoints and that bad input is rejected with a 400 naming the field.
export function setup() {
  const health = http.get(`${BASE_URL}/healthz`);
  check(health, { 'healthz answered 200': (r) => r.status === 200 });
  const ready = http.get(`${BASE_URL}/readyz`);
  check(ready, { 'readyz answered 200': (r) => r.status === 200 });

  const rejected = { responseCallback: http.expectedStatuses(400), tags: { name: 'rejected' } };
  const cases = [
    { body: 'deviceId=d-1&impressions=', field: 'body' },
    { body: '{"impressions": []}', field: 'deviceId' },
    { body: '{"deviceId": "d-1", "impressions": [{"feature": "Banner"}]}', field: 'impressions[0].impressionId' },
    { body: '{"deviceId": "d-1", "events": [{"eventId": "", "name": "Click"}]}', field: 'events[0].eventId' },
  ];
  for (const { body, field } of cases) {
    const response = http.post(`${BASE_URL}/v1/collect`, body, {
      ...rejected,
      headers: { 'Content-Type': 'application/json' },
    });
    check(response, {
      'bad batch answered 400': (r) => r.status === 400,
      'bad batch names its field': (r) => r.status === 400 && r.json('field') === field,
    });
  }
}

export default function () {
  visit(VUS);
}
