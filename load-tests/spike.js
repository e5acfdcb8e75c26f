// Spike test: a steady rate, a sudden jump to SPIKE_FACTOR times that rate, and back.
// The server must respond to every request through the spike, within looser latency.
//
//   RATE=20 SPIKE_FACTOR=10 k6 run load-tests/spike.js

import { positiveInt, visit } from './lib/traffic.js';

const RATE = positiveInt('RATE', 20);
const PEAK = RATE * positiveInt('SPIKE_FACTOR', 10);
const MAX_VUS = positiveInt('MAX_VUS', Math.max(20, PEAK * 4));
const STEADY = __ENV.STEADY || '30s';
const HOLD = __ENV.HOLD || '30s';

export const options = {
  scenarios: {
    visits: {
      executor: 'ramping-arrival-rate',
      startRate: RATE,
      timeUnit: '1s',
      preAllocatedVUs: Math.min(MAX_VUS, RATE * 4),
      maxVUs: MAX_VUS,
      stages: [
        { target: RATE, duration: STEADY },
        { target: PEAK, duration: '5s' },
        { target: PEAK, duration: HOLD },
        { target: RATE, duration: '5s' },
        { target: RATE, duration: STEADY },
      ],
      gracefulStop: '10s',
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    'http_req_duration{name:collect}': [`p(99)<${__ENV.P99_MS || 200}`],
  },
};

export default function () {
  visit(MAX_VUS);
}
