// The official Durable Streams conformance suite, unchanged: run.mjs starts
// jobcast and passes its DS base URL in CONFORMANCE_TEST_URL.
import { runConformanceTests } from '@durable-streams/server-conformance-tests';

const baseUrl = process.env.CONFORMANCE_TEST_URL;
if (!baseUrl) throw new Error('CONFORMANCE_TEST_URL is required (run through run.mjs)');
// run.mjs starts jobcast with --ds-long-poll 3s.
runConformanceTests({ baseUrl, longPollTimeoutMs: 3000 });
