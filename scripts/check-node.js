#!/usr/bin/env node
// Node's version against what the pinned npm packages declare (`engines.node` of every package in
// package-lock.json), read with npm's own semver.
//
//   node scripts/check-node.js              exit 0 if this Node fits; else list what does not, exit 1
//   node scripts/check-node.js V1 V2 ...    print the first version that fits every package, exit 0;
//                                           exit 1 if none does (setup tries the apt candidates so)
//   exit 2: npm (whose semver reads the ranges) is missing
'use strict';

const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

function npmSemver() {
  try {
    const root = execFileSync('npm', ['root', '-g'], { encoding: 'utf8' }).trim();
    return require(path.join(root, 'npm', 'node_modules', 'semver'));
  } catch (err) {
    process.stderr.write(`check-node: cannot load npm's semver (is npm installed?): ${err.message.split('\n')[0]}\n`);
    process.exit(2);
  }
}

const semver = npmSemver();
const lock = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'package-lock.json'), 'utf8'));
const wanted = [];
for (const [where, pkg] of Object.entries(lock.packages || {})) {
  const range = pkg.engines && !Array.isArray(pkg.engines) ? pkg.engines.node : undefined;
  if (!range || pkg.dev || pkg.optional) continue;
  wanted.push({ name: where.replace(/^.*node_modules\//, '') || lock.name, version: pkg.version, range });
}

function misfits(version) {
  return wanted.filter((w) => !semver.satisfies(version, w.range, { includePrerelease: true }));
}

const candidates = process.argv.slice(2);
if (candidates.length) {
  const fit = candidates.find((v) => semver.valid(semver.coerce(v)) && misfits(semver.coerce(v).version).length === 0);
  if (fit) {
    process.stdout.write(fit + '\n');
    process.exit(0);
  }
  process.exit(1);
}
const bad = misfits(process.versions.node);
if (bad.length === 0) process.exit(0);
const shown = bad.slice(0, 8).map((w) => `  ${w.name}@${w.version} declares node ${w.range}`).join('\n');
process.stderr.write(`Node ${process.versions.node} does not fit the pinned npm packages:\n${shown}\n` +
  (bad.length > 8 ? `  ... and ${bad.length - 8} more\n` : ''));
process.exit(1);
