//! OCI images: pull and import requests, the image record, its events.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Credentials for the registry: basic (`username` + `password`) or a
/// bearer `token`. Never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum RegistryAuth {
    Basic { username: String, password: String },
    Token { token: String },
}

/// `POST /images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// `registry[:port]/repository[:tag]` or `…@sha256:<hex>`; without a
    /// registry, Docker Hub.
    #[serde(rename = "ref")]
    #[schema(min_length = 1, max_length = 512)]
    pub reference: String,
    /// Plain HTTP to the registry (one on loopback or a private network).
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub auth: Option<RegistryAuth>,
}

/// Where an image record is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    /// Being pulled or imported; its events say how far.
    Pulling,
    /// Its filesystem is built: machines can use it.
    Ready,
    /// The pull or import failed; `error` says why. Nothing of it is kept.
    Failed,
}

impl ImageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Pulling => "pulling",
            ImageStatus::Ready => "ready",
            ImageStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<ImageStatus> {
        Some(match s {
            "pulling" => ImageStatus::Pulling,
            "ready" => ImageStatus::Ready,
            "failed" => ImageStatus::Failed,
            _ => return None,
        })
    }
}

/// One layer of an image and how much of it is downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageLayer {
    pub digest: String,
    /// Compressed size, as the manifest says.
    pub size: u64,
    /// Bytes downloaded (equal to `size` once done).
    pub done: u64,
}

/// What a machine made from the image runs, from the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// An image record of a tenant. Records of the same image (same `digest`)
/// share one filesystem on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// `img_` and 16 characters.
    pub id: String,
    /// The reference pulled; null for an import.
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// `registry` or `import`.
    pub source: String,
    pub status: ImageStatus,
    /// The image config's digest (`sha256:…`): the image's identity, known
    /// once the manifest is read.
    pub digest: Option<String>,
    /// The manifest's digest, when the image came with one.
    pub manifest_digest: Option<String>,
    /// Size of the image's filesystem file on the host.
    pub size_bytes: Option<u64>,
    pub layers: Vec<ImageLayer>,
    pub config: Option<ImageRunConfig>,
    /// Why the pull or import failed.
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// `GET /images`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<Image>,
}

/// One step of a pull or import. Kinds: `pulling`, `resolved`, `reused`
/// (the filesystem existed: no image work), `layer_progress`, `layer_done`,
/// `unpacking`, `building`, `built`, `ready`, `failed`, `deleted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageEvent {
    /// Increasing; `layer_progress` events are live only (not stored) and
    /// carry the id of the last stored event.
    pub id: i64,
    pub image_id: String,
    pub at: String,
    pub kind: String,
    pub message: Option<String>,
    /// The event's fields (layer index, bytes, digests…), or null.
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
}

/// `GET /images/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageEventList {
    pub events: Vec<ImageEvent>,
}
