// The copy of eventsource-parser served to browsers is the npm package's own
// file (minus its source-map comment), so Node and browsers parse alike.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { test } from 'node:test';

test('vendor/eventsource-parser.js equals the installed package', () => {
  const require = createRequire(import.meta.url);
  const pkg = require('eventsource-parser/package.json');
  const installed = readFileSync(new URL('../node_modules/eventsource-parser/dist/index.js', import.meta.url), 'utf8')
    .split('\n')
    .filter((l) => !l.startsWith('//# sourceMappingURL'))
    .join('\n');
  const vendored = readFileSync(new URL('../vendor/eventsource-parser.js', import.meta.url), 'utf8');
  const [l1, l2, ...rest] = vendored.split('\n');
  assert.ok(l1.includes(`eventsource-parser ${pkg.version} `), `${l1} names version ${pkg.version}`);
  assert.ok(l2.startsWith('// '));
  assert.equal(rest.join('\n'), installed, 'run the copy command in clients/js/README.md ("Vendored parser")');
});
