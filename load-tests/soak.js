// Soak test: a moderate constant rate for a long time, with many returning visitors, so
// sessions keep expiring and reopening. Run the server with a short --session-timeout so the
// sweeper and the writer work throughout, and watch its memory beside the run.
//
//   RATE=30 DURATION=30m VISITORS=20000 k6 run load-tests/soak.js

import { constantRate, positiveInt, visit } from './lib/traffic.js';

const RATE = positiveInt('RATE', 30);
const MAX_VUS = positiveInt('MAX_VUS', Math.max(10, RATE * 4));

export const options = {
  scenarios: {
    visits: constantRate(RATE, MAX_VUS, __ENV.DURATION || '30m'),
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    'http_req_duration{name:collect}': [`p(99)<${__ENV.P99_MS || 50}`, 'p(50)<10'],
  },
};

export default function () {
  visit(MAX_VUS);
}
