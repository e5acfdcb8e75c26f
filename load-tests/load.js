// Load test: visits arrive at a constant rate, whatever the server's latency.
// Each visit sends three or four requests spread over about 2 x THINK_MS.
//
//   RATE=50 DURATION=2m VISITORS=5000 k6 run load-tests/load.js

import { constantRate, positiveInt, visit } from './lib/traffic.js';

const RATE = positiveInt('RATE', 50);
const MAX_VUS = positiveInt('MAX_VUS', Math.max(10, RATE * 4));

export const options = {
  scenarios: {
    visits: constantRate(RATE, MAX_VUS, __ENV.DURATION || '1m'),
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    'http_req_duration{name:collect}': [`p(99)<${__ENV.P99_MS || 50}`],
    dropped_iterations: [`count<${Math.max(1, RATE)}`],
  },
};

export default function () {
  visit(MAX_VUS);
}
