//! API keys: scopes, creation and listing. Secrets are shown once, at creation.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a key may do. `admin` implies every other scope.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read machines, events and health.
    Read,
    /// Create, change the state of and delete machines.
    Write,
    /// Run commands and move files inside machines.
    Exec,
    /// Manage API keys; implies read, write and exec.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Write, Scope::Exec, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Exec => "exec",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// A label for people, 1–64 characters.
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// At least one scope.
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
    /// The tenant the key acts for (lowercase letters, digits, `-` and `_`,
    /// 1–63 characters); defaults to the creating key's tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9_-]{1,63}$")]
    pub tenant: Option<String>,
    /// Lifetime in seconds (60 s to 10 years); no expiry when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 60, maximum = 315360000)]
    pub expires_in_seconds: Option<u64>,
}

/// The answer to a key creation: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    /// The secret, `hf_…`. Store it now: the server keeps only its hash.
    pub key: String,
    #[serde(flatten)]
    pub info: ApiKey,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// The first characters of the secret, to tell keys apart.
    pub prefix: String,
    pub tenant: String,
    pub scopes: Vec<Scope>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<ApiKey>,
}
