//! Pulls from a registry with the `oci-client` crate (the OCI distribution
//! API: token and basic auth, image indexes resolved to linux/amd64, the
//! manifest's digest checked against the reference's or the registry's
//! `Docker-Content-Digest`). Blobs are streamed through our own code so each
//! is size-bounded by its descriptor and the limits, hashed as it arrives,
//! and renamed into the blob store only once its digest matched.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use super::{
    build, digest_hex, io_err, verify, BuiltImage, ImageError, ImageStore, LayerInfo, Progress,
    PullEvent,
};

/// Credentials for a registry.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// A bearer token used as is.
    Token(String),
}

/// What to pull.
#[derive(Debug, Clone)]
pub struct PullRequest {
    /// `registry[:port]/repository[:tag|@digest]`.
    pub reference: String,
    /// Plain HTTP (a registry on a private network or loopback).
    pub insecure: bool,
    pub auth: Auth,
}

/// Parses a reference the way `docker pull` does (Docker Hub by default).
pub fn parse_reference(r: &str) -> Result<Reference, ImageError> {
    r.parse::<Reference>()
        .map_err(|e| ImageError::BadReference {
            reference: r.to_string(),
            message: e.to_string(),
        })
}

fn registry_err(
    doing: &str,
) -> impl Fn(oci_client::errors::OciDistributionError) -> ImageError + '_ {
    move |e| ImageError::Registry {
        doing: doing.to_string(),
        message: e.to_string(),
    }
}

/// Pulls `req` and builds its filesystem (or finds it built).
pub async fn pull(
    store: Arc<ImageStore>,
    req: &PullRequest,
    progress: Progress,
) -> Result<BuiltImage, ImageError> {
    let reference = parse_reference(&req.reference)?;
    let client = Client::new(ClientConfig {
        protocol: if req.insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    });
    let auth = match &req.auth {
        Auth::Anonymous => RegistryAuth::Anonymous,
        Auth::Basic { username, password } => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Auth::Token(t) => RegistryAuth::Bearer(t.clone()),
    };
    let (manifest, manifest_digest) = client
        .pull_image_manifest(&reference, &auth)
        .await
        .map_err(registry_err("reading the manifest"))?;
    let limits = store.limits();
    if manifest.layers.len() > limits.max_layers {
        return Err(ImageError::TooLarge(format!(
            "{} layers (at most {})",
            manifest.layers.len(),
            limits.max_layers
        )));
    }
    let total: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
    if total > limits.max_download_bytes {
        return Err(ImageError::TooLarge(format!(
            "{total} bytes of layers (at most {})",
            limits.max_download_bytes
        )));
    }
    let config_raw =
        fetch_small(&client, &reference, &manifest.config, limits.max_json_bytes).await?;
    let digest = manifest.config.digest.clone();
    progress(PullEvent::Resolved {
        digest: digest.clone(),
        manifest_digest: Some(manifest_digest),
        layers: manifest
            .layers
            .iter()
            .map(|l| LayerInfo {
                digest: l.digest.clone(),
                size: l.size.max(0) as u64,
            })
            .collect(),
    });
    if let Some(b) = store.get(&digest) {
        progress(PullEvent::Reused { digest });
        return Ok(b);
    }
    let lock = store.lock_for(&digest);
    let _held = lock.lock().await;
    if let Some(b) = store.get(&digest) {
        progress(PullEvent::Reused { digest });
        return Ok(b);
    }
    // Boxed and collected first: a lazily mapped iterator of borrowing
    // futures trips the compiler's higher-ranked lifetime inference in
    // `tokio::spawn`.
    type Fetch<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<std::fs::File, ImageError>> + Send + 'a>,
    >;
    let mut fetches: Vec<Fetch<'_>> = Vec::new();
    for (i, desc) in manifest.layers.iter().enumerate() {
        let (store, client, reference, progress) =
            (store.clone(), &client, &reference, progress.clone());
        fetches.push(Box::pin(async move {
            fetch_layer(&store, client, reference, desc, i, &progress).await
        }));
    }
    if manifest.layers.len() != super::diff_ids(&config_raw)?.len() {
        return Err(ImageError::Invalid(
            "the manifest and the config name different numbers of layers".into(),
        ));
    }
    // Downloads (three at a time) feed the builder in layer order, so layer
    // i is unpacked while later ones still arrive; every blob is verified
    // before it is handed over.
    let (tx, rx) = std::sync::mpsc::channel();
    let st = store.clone();
    let builder = tokio::task::spawn_blocking(move || {
        build::build(&st, &config_raw, rx.into_iter(), &progress)
    });
    let mut fetched = futures_util::stream::iter(fetches).buffered(3);
    let mut failed = None;
    let mut next = manifest.layers.iter();
    while let Some(r) = fetched.next().await {
        let digest = next.next().map(|l| l.digest.clone()).unwrap_or_default();
        match r {
            Ok(f) => {
                if tx.send(Ok((digest, f))).is_err() {
                    break; // The builder failed; it says why.
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(fetched);
    drop(tx);
    let built = builder
        .await
        .unwrap_or_else(|e| Err(ImageError::Build(format!("the build task failed: {e}"))));
    // Built: the filesystem holds the content now and the blobs only take
    // room; failed: nothing of the pull is kept.
    for l in &manifest.layers {
        if let Ok(p) = store.blob_path(&l.digest) {
            let _ = std::fs::remove_file(p);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => built,
    }
}

/// An error of a blob stream: oci-client's own digest check (it verifies
/// the stream against the descriptor as it ends) is a verification
/// failure like ours.
fn stream_err(e: std::io::Error, digest: &str) -> ImageError {
    let is_digest = e
        .get_ref()
        .is_some_and(|i| i.is::<oci_client::errors::DigestError>());
    if is_digest {
        return ImageError::Digest {
            digest: digest.to_string(),
            message: e.to_string(),
        };
    }
    ImageError::Registry {
        doing: format!("fetching blob {digest}"),
        message: e.to_string(),
    }
}

/// A small blob (the config) read into memory, bounded and verified.
async fn fetch_small(
    client: &Client,
    reference: &Reference,
    desc: &OciDescriptor,
    limit: u64,
) -> Result<Vec<u8>, ImageError> {
    digest_hex(&desc.digest)?;
    if desc.size < 0 || desc.size as u64 > limit {
        return Err(ImageError::TooLarge(format!(
            "the config blob is {} bytes (at most {limit})",
            desc.size
        )));
    }
    let mut stream = client
        .pull_blob_stream(reference, desc)
        .await
        .map_err(registry_err("fetching the image config"))?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| stream_err(e, &desc.digest))?;
        out.extend_from_slice(&chunk);
        if out.len() as u64 > desc.size as u64 {
            return Err(ImageError::Digest {
                digest: desc.digest.clone(),
                message: format!(
                    "the registry sent more than the {} bytes declared",
                    desc.size
                ),
            });
        }
    }
    verify(&out, &desc.digest)?;
    Ok(out)
}

/// One layer blob into the blob store (unless it is there), verified;
/// returns it opened, so a concurrent removal cannot take it away.
async fn fetch_layer(
    store: &ImageStore,
    client: &Client,
    reference: &Reference,
    desc: &OciDescriptor,
    layer: usize,
    progress: &Progress,
) -> Result<std::fs::File, ImageError> {
    let path = store.blob_path(&desc.digest)?;
    let open = |p: &std::path::Path| {
        std::fs::File::open(p).map_err(io_err(format!("opening blob {}", desc.digest)))
    };
    if path.exists() {
        progress(PullEvent::LayerDone {
            layer,
            cached: true,
        });
        return open(&path);
    }
    let lock = store.lock_for(&desc.digest);
    let _held = lock.lock().await;
    if path.exists() {
        progress(PullEvent::LayerDone {
            layer,
            cached: true,
        });
        return open(&path);
    }
    let total = desc.size.max(0) as u64;
    if total > store.limits().max_download_bytes {
        return Err(ImageError::TooLarge(format!(
            "layer {} is {total} bytes (at most {})",
            desc.digest,
            store.limits().max_download_bytes
        )));
    }
    let work = store.work_dir("blob")?;
    let tmp = work.0.join("data");
    let mut file = std::fs::File::create(&tmp).map_err(io_err("creating a blob download"))?;
    let mut stream = client
        .pull_blob_stream(reference, desc)
        .await
        .map_err(registry_err("fetching a layer"))?;
    let mut hash = Sha256::new();
    let (mut done, mut reported) = (0u64, 0u64);
    let step = (total / 20).max(1 << 20);
    progress(PullEvent::LayerProgress {
        layer,
        done: 0,
        total,
    });
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| stream_err(e, &desc.digest))?;
        done += chunk.len() as u64;
        if done > total {
            return Err(ImageError::Digest {
                digest: desc.digest.clone(),
                message: format!("the registry sent more than the {total} bytes declared"),
            });
        }
        hash.update(&chunk);
        file.write_all(&chunk)
            .map_err(io_err("writing a blob download"))?;
        if done - reported >= step {
            reported = done;
            progress(PullEvent::LayerProgress { layer, done, total });
        }
    }
    let got = format!("sha256:{}", hex::encode(hash.finalize()));
    if done != total || got != desc.digest {
        return Err(ImageError::Digest {
            digest: desc.digest.clone(),
            message: format!("received {done} of {total} bytes with digest {got}"),
        });
    }
    file.sync_all().map_err(io_err("syncing a blob"))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io_err("storing a blob"))?;
    // Crash tests: a daemon killed with a verified blob stored and the
    // pull unfinished (`HYPERFLEET_CRASH_AT=images.after_layer`).
    fail::fail_point!("images.after_layer");
    progress(PullEvent::LayerProgress { layer, done, total });
    progress(PullEvent::LayerDone {
        layer,
        cached: false,
    });
    open(&path)
}
