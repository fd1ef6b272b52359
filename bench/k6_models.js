// k6 script for the model-aware scenario (bench/model_aware.py): a fixed request rate with one
// VU; each request names a model drawn at random from BENCH_MODELS and goes to a base URL drawn
// at random from BENCH_URLS (a Service spreading requests over runtimes), or to the one proxy.
// Answers that a runtime forwarded to the model's holder carry X-Bench-Forwarded: 1; the share
// of them is the `forwarded` rate. Draws come from a seeded Park-Miller generator, so both
// paths see the same sequence of models.
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Rate } from 'k6/metrics';

const body = open(__ENV.BENCH_BODY);
const urls = __ENV.BENCH_URLS.split(',');
const models = __ENV.BENCH_MODELS.split(',');
const rate = Number(__ENV.BENCH_RATE || 100);
const warmupS = Number(__ENV.BENCH_WARMUP || 2);
const durationS = Number(__ENV.BENCH_DURATION || 15);
const vus = Number(__ENV.BENCH_VUS || 1);  // one keep-alive connection each
const headers = { 'content-type': 'application/json' };
const forwarded = new Rate('forwarded');
let seed = Number(__ENV.BENCH_SEED || 42);

function draw(n) {
  seed = (seed * 16807) % 2147483647;
  return Math.floor((seed / 2147483647) * n);
}

export const options = {
  discardResponseBodies: true,
  scenarios: {
    models: {
      executor: 'constant-arrival-rate',
      rate: rate,
      timeUnit: '1s',
      duration: `${warmupS + durationS}s`,
      preAllocatedVUs: vus,
      maxVUs: vus,
    },
  },
  thresholds: {
    'http_req_duration{phase:measure}': ['max>=0'],
    'http_req_failed{phase:measure}': ['rate>=0'],
    'checks{phase:measure}': ['rate>=0'],
    'forwarded{phase:measure}': ['rate>=0'],
  },
};

export default function () {
  const elapsedS = (Date.now() - exec.scenario.startTime) / 1000;
  const phase = elapsedS < warmupS ? 'warmup' : 'measure';
  const base = urls[draw(urls.length)];
  const model = models[draw(models.length)];
  const res = http.post(`${base}/v2/models/${model}/infer`, body,
                        { headers: headers, tags: { phase: phase, name: 'infer' } });
  check(res, { 'status is 200': (r) => r.status === 200 }, { phase: phase });
  forwarded.add(res.headers['X-Bench-Forwarded'] === '1', { phase: phase });
}

export function handleSummary(data) {
  return { [__ENV.BENCH_SUMMARY]: JSON.stringify(data, null, 1) };
}
