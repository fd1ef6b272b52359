// k6 script for bench/run.py: a fixed request rate over BENCH_VUS keep-alive connections (one per VU, default 1).
// The first BENCH_WARMUP seconds are tagged phase=warmup and left out of the reported numbers,
// so the same VU (and connection) carries on warm into the measured part.
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';

const body = open(__ENV.BENCH_BODY);
const url = __ENV.BENCH_URL;
const rate = Number(__ENV.BENCH_RATE || 100);
const warmupS = Number(__ENV.BENCH_WARMUP || 2);
const durationS = Number(__ENV.BENCH_DURATION || 20);
const vus = Number(__ENV.BENCH_VUS || 1);  // one keep-alive connection each
const headers = { 'content-type': 'application/json' };

export const options = {
  discardResponseBodies: true,
  scenarios: {
    latency: {
      executor: 'constant-arrival-rate',
      rate: rate,
      timeUnit: '1s',
      duration: `${warmupS + durationS}s`,
      preAllocatedVUs: vus,
      maxVUs: vus,
    },
  },
  // Thresholds that always pass: they make k6 keep the measured sub-metrics in the summary.
  thresholds: {
    'http_req_duration{phase:measure}': ['max>=0'],
    'http_req_failed{phase:measure}': ['rate>=0'],
    'checks{phase:measure}': ['rate>=0'],
  },
};

export default function () {
  const elapsedS = (Date.now() - exec.scenario.startTime) / 1000;
  const phase = elapsedS < warmupS ? 'warmup' : 'measure';
  const res = http.post(url, body, { headers: headers, tags: { phase: phase } });
  check(res, { 'status is 200': (r) => r.status === 200 }, { phase: phase });
}

export function handleSummary(data) {
  return { [__ENV.BENCH_SUMMARY]: JSON.stringify(data, null, 1) };
}
