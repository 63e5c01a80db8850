// OCI images against the real daemon with the stub backend: the empty list,
// unknown ids, a pull from an unreachable registry (ends failed), and an
// import of a small OCI image layout built here (the daemon unpacks it and
// makes its filesystem with mkfs.ext4), a machine made from it, deletion.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { after, before, test } from "node:test";

import { ConflictError, Hyperfleet, Image, ImageFailedError, NotFoundError, ValidationError } from "hyperfleet";
import { Daemon } from "./daemon.mjs";

let d;
let hf;
let tmp;

before(async () => {
  d = await Daemon.start();
  hf = new Hyperfleet({ url: d.url, apiKey: d.key });
  tmp = mkdtempSync(join(tmpdir(), "hf-tssdk-img-"));
});

after(async () => {
  await d?.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

/** A tar (ustar) of regular files. */
function tar(files) {
  const parts = [];
  for (const [name, data] of Object.entries(files)) {
    const h = Buffer.alloc(512);
    const field = (off, len, s) => h.write(s, off, len, "ascii");
    const octal = (off, len, n) => field(off, len, n.toString(8).padStart(len - 1, "0") + "\0");
    field(0, 100, name);
    octal(100, 8, name.startsWith("bin/") ? 0o755 : 0o644);
    octal(108, 8, 0);
    octal(116, 8, 0);
    octal(124, 12, data.length);
    octal(136, 12, 0);
    h.fill(" ", 148, 156);
    field(156, 1, "0");
    field(257, 8, "ustar\u000000");
    let sum = 0;
    for (const b of h) sum += b;
    field(148, 8, sum.toString(8).padStart(6, "0") + "\0 ");
    parts.push(h, data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

const sha = (b) => "sha256:" + createHash("sha256").update(b).digest("hex");

/** A one-layer OCI image layout as a tar, as `skopeo copy … oci-archive:` makes. */
function ociLayoutTar(marker) {
  const layerTar = tar({ "etc/marker": Buffer.from(marker), "bin/hello": Buffer.from("#!/bin/sh\necho hi\n") });
  const layer = gzipSync(layerTar);
  const config = Buffer.from(JSON.stringify({
    architecture: "amd64",
    os: "linux",
    config: { Cmd: ["/bin/hello"], Env: ["PATH=/bin"], WorkingDir: "/" },
    rootfs: { type: "layers", diff_ids: [sha(layerTar)] },
  }));
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: sha(config), size: config.length },
    layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: sha(layer), size: layer.length }],
  }));
  const index = { schemaVersion: 2, manifests: [{ mediaType: "application/vnd.oci.image.manifest.v1+json", digest: sha(manifest), size: manifest.length }] };
  const files = { "oci-layout": Buffer.from('{"imageLayoutVersion": "1.0.0"}'), "index.json": Buffer.from(JSON.stringify(index)) };
  for (const b of [layer, config, manifest]) files[`blobs/sha256/${sha(b).slice(7)}`] = b;
  return tar(files);
}

test("list, unknown ids, and a pull that fails", async () => {
  assert.deepEqual(await hf.images.list(), []);
  await assert.rejects(hf.images.get("img_0000000000000000"), NotFoundError);
  await assert.rejects(hf.images.delete("img_0000000000000000"), NotFoundError);
  await assert.rejects(hf.images.events("img_0000000000000000").next(), NotFoundError);

  const img = await hf.images.pull({ ref: "127.0.0.1:1/x:y", insecure: true });
  assert.ok(img instanceof Image);
  assert.equal(img.ref, "127.0.0.1:1/x:y");
  assert.equal(img.source, "registry");
  assert.ok(["pulling", "failed"].includes(img.status));
  await assert.rejects(img.waitReady({ timeout: 60 }), (e) => {
    assert.ok(e instanceof ImageFailedError);
    assert.equal(e.image, img);
    return true;
  });
  assert.equal(img.status, "failed");
  assert.ok(img.error, "the failure says why");
  const kinds = [];
  for await (const ev of img.events()) kinds.push(ev.kind);
  assert.equal(kinds[0], "pulling");
  assert.equal(kinds.at(-1), "failed");
  const followed = [];
  for await (const ev of hf.images.events(img, { follow: true })) followed.push(ev.kind);
  assert.equal(followed.at(-1), "failed");
  assert.deepEqual((await hf.images.list()).map((i) => i.id), [img.id]);
  await img.delete();
  await assert.rejects(hf.images.get(img.id), NotFoundError);
});

test("import (path, bytes), a machine from the image, and deletion", async () => {
  const path = join(tmp, "image.tar");
  writeFileSync(path, ociLayoutTar("one"));
  const img = await hf.images.importArchive(path);
  assert.equal(img.status, "ready");
  assert.equal(img.source, "import");
  assert.equal(img.ref ?? null, null);
  assert.match(img.digest, /^sha256:/);
  assert.deepEqual(img.config.cmd, ["/bin/hello"]);
  assert.equal(await img.waitReady(), img);
  const again = await hf.images.importArchive(new Uint8Array(ociLayoutTar("one")));
  assert.notEqual(again.id, img.id);
  assert.equal(again.digest, img.digest);
  await hf.images.delete(again);

  const m = await hf.machines.create({ image: img.id });
  try {
    assert.deepEqual(m.ociImage, { id: img.id, digest: img.digest, ref: null });
    await assert.rejects(img.delete(), ConflictError);
  } finally {
    await m.dispose();
  }
  await img.delete();
  await assert.rejects(hf.images.importArchive(new TextEncoder().encode("not a tar at all")), ValidationError);
  for (const i of await hf.images.list()) await i.delete();
  const plain = await hf.machines.create({});
  try {
    assert.equal(plain.ociImage ?? null, null);
  } finally {
    await plain.dispose();
  }
});
