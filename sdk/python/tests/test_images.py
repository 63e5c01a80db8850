"""OCI images against the stub daemon, with the sync and the asyncio client:
the empty list, unknown ids, a pull from an unreachable registry (ends
``failed``), and an import of a small OCI image layout built here (the
daemon unpacks it and makes its filesystem with ``mkfs.ext4``), a machine
made from it, and its deletion."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

import hyperfleet
from hyperfleet import AsyncHyperfleet

from conftest import Daemon, unique


def _tar(files: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.startswith("bin/") else 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(data: bytes) -> Tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def oci_layout_tar(marker: str) -> bytes:
    """A one-layer OCI image layout as a tar, as ``skopeo copy ... oci-archive:`` makes."""
    layer_digest, layer = _blob(
        gzip.compress(_tar({"etc/marker": marker.encode(), "bin/hello": b"#!/bin/sh\necho hi\n"}))
    )
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    config_digest, config = _blob(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/hello"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode()
    )
    manifest_digest, manifest = _blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
            }
        ],
    }
    files = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps(index).encode(),
    }
    for digest, data in (
        (layer_digest, layer),
        (config_digest, config),
        (manifest_digest, manifest),
    ):
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    return _tar(files)


@pytest.fixture(scope="module")
def images_daemon() -> Iterator[Daemon]:
    """A daemon of its own, so that the image list starts empty."""
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()


def test_images_list_get_delete_and_a_failed_pull(images_daemon: Daemon) -> None:
    with images_daemon.client() as hf:
        assert hf.images.list() == []
        with pytest.raises(hyperfleet.NotFound):
            hf.images.get("img_0000000000000000")
        with pytest.raises(hyperfleet.NotFound):
            hf.images.delete("img_0000000000000000")
        with pytest.raises(hyperfleet.NotFound):
            list(hf.images.events("img_0000000000000000"))
        with pytest.raises((hyperfleet.BadRequest, hyperfleet.ValidationError)):
            hf.images.pull("NOT A REFERENCE")

        img = hf.images.pull("127.0.0.1:1/x:y", insecure=True)
        assert isinstance(img, hyperfleet.Image)
        assert (img.ref, img.source) == ("127.0.0.1:1/x:y", "registry")
        assert img.status in ("pulling", "failed")
        with pytest.raises(hyperfleet.ImageFailed) as e:
            img.wait_ready(timeout=60)
        assert img.status == "failed" and img.error, "the failure says why"
        assert e.value.image is img
        kinds = [ev.kind for ev in img.events()]
        assert kinds[0] == "pulling" and kinds[-1] == "failed"
        assert [ev.kind for ev in img.events(follow=True)][-1] == "failed"
        assert [x.id for x in hf.images.list()] == [img.id]
        assert hf.images.get(img.id).status == "failed"
        img.delete()
        with pytest.raises(hyperfleet.NotFound):
            hf.images.get(img.id)


def test_import_and_a_machine_from_the_image(images_daemon: Daemon, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(oci_layout_tar("one"))
    with images_daemon.client() as hf:
        img = hf.images.import_archive(archive)  # a path, streamed
        assert (img.status, img.source, img.ref) == ("ready", "import", None)
        assert img.digest and img.digest.startswith("sha256:")
        assert img.config is not None and img.config.cmd == ["/bin/hello"]
        assert img.wait_ready() is img
        kinds = [ev.kind for ev in hf.images.events(img.id)]
        assert kinds[-1] == "ready"
        # The same archive again, as a file object: a record of the same image.
        with open(archive, "rb") as f:
            again = hf.images.import_archive(f)
        assert again.id != img.id and again.digest == img.digest
        hf.images.delete(again)

        with hf.machines.create(unique("fromimg"), image=img) as m:
            assert m.oci_image is not None
            assert (m.oci_image.id, m.oci_image.digest, m.oci_image.ref) == (
                img.id,
                img.digest,
                None,
            )
            assert m.refresh().oci_image == m.oci_image
            # The image's command is the main process; no policy by default.
            assert m.process is not None and m.process.argv == ["/bin/hello"]
            assert m.restart_policy == hyperfleet.RestartPolicy(policy="no")
            assert (m.restart_count, m.exit_code) == (0, None)
            with pytest.raises(hyperfleet.Conflict):
                img.delete()  # a machine is made from it
        with hf.machines.create(
            unique("overrides"),
            image=img,
            entrypoint=["/bin/sh", "-c"],
            cmd=["exit 3"],
            user="1000:1000",
            restart=hyperfleet.RestartPolicy(policy="on-failure"),
        ) as m:
            assert m.process is not None
            assert (m.process.argv, m.process.user) == (["/bin/sh", "-c", "exit 3"], "1000:1000")
            assert m.restart_policy == hyperfleet.RestartPolicy(policy="on-failure", max_retries=3)
        with pytest.raises(hyperfleet.Conflict):
            hf.machines.create(unique("noimage"), cmd=["x"])  # needs an image
        img.delete()

        with pytest.raises(hyperfleet.ValidationError):
            hf.images.import_archive(b"not a tar at all")
        failed = [x for x in hf.images.list() if x.status == "failed" and x.source == "import"]
        assert failed and failed[-1].error
        for x in failed:
            x.delete()
    with images_daemon.client() as hf:
        with hf.machines.create(unique("plain")) as m:
            assert m.oci_image is None


def test_async_images(images_daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncHyperfleet(images_daemon.url, images_daemon.key) as hf:
            with pytest.raises(hyperfleet.NotFound):
                await hf.images.get("img_0000000000000000")
            img = await hf.images.import_archive(oci_layout_tar("async"))
            assert isinstance(img, hyperfleet.AsyncImage) and img.status == "ready"
            assert img.id in {x.id for x in await hf.images.list()}
            assert [e.kind async for e in img.events()][-1] == "ready"
            async with hf.machines.create(unique("afromimg"), image=img.id) as m:
                assert m.oci_image is not None and m.oci_image.id == img.id
            await img.delete()
            bad = await hf.images.pull("127.0.0.1:1/x:y", insecure=True)
            with pytest.raises(hyperfleet.ImageFailed):
                await bad.wait_ready(timeout=60)
            await hf.images.delete(bad)
            with pytest.raises(hyperfleet.NotFound):
                await bad.refresh()

    asyncio.run(asyncio.wait_for(main(), 120))
