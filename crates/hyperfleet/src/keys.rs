//! `hyperfleet keys …`: API key management through the API (admin scope).

use anyhow::Context;
use hyperfleet_api::{CreateKeyRequest, Scope};
use hyperfleet_client::Client;

use crate::cli::{ClientArgs, KeysCmd};
use crate::output;

pub(crate) async fn run(args: &ClientArgs, cmd: KeysCmd) -> anyhow::Result<()> {
    // The local recovery needs no server (and no working key).
    if let KeysCmd::Create {
        name, admin: true, ..
    } = cmd
    {
        return create_local_admin(args, name).await;
    }
    let c = Client::new(&args.url, crate::serve::api_key(args)).context("bad server URL")?;
    match cmd {
        KeysCmd::Create {
            name,
            scopes,
            tenant,
            expires_in,
            ..
        } => {
            // clap requires --name unless --admin is given.
            let name = name.context("--name is required")?;
            let scopes = scopes
                .iter()
                .map(|s| {
                    Scope::parse(s).with_context(|| {
                        format!("unknown scope '{s}'; expected read, write, exec or admin")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let created = c
                .create_key(&CreateKeyRequest {
                    name,
                    scopes,
                    tenant,
                    expires_in_seconds: expires_in,
                })
                .await?;
            if args.json {
                return output::json(&created);
            }
            println!("{}", created.key);
            eprintln!(
                "created {} for tenant '{}' with scopes {}; the secret above is shown only once",
                created.info.id,
                created.info.tenant,
                created
                    .info
                    .scopes
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            Ok(())
        }
        KeysCmd::List => {
            let list = c.list_keys().await?;
            if args.json {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .keys
                .iter()
                .map(|k| {
                    vec![
                        k.id.clone(),
                        k.name.clone(),
                        k.tenant.clone(),
                        k.scopes
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("{}…", k.prefix),
                        k.expires_at.clone().unwrap_or_else(|| "-".into()),
                        k.revoked_at.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ID", "NAME", "TENANT", "SCOPES", "PREFIX", "EXPIRES", "REVOKED",
                ],
                &rows,
            );
            Ok(())
        }
        KeysCmd::Revoke { id } => {
            c.revoke_key(&id).await?;
            if !args.json {
                println!("revoked {id}");
            }
            Ok(())
        }
    }
}

/// `keys create --admin`: the local recovery from a lockout (every admin
/// key lost or revoked). Writes an operator admin key straight into the
/// database; SQLite's WAL lets it do so while the daemon runs, and the
/// daemon finds keys it does not know in the database on their first use.
async fn create_local_admin(args: &ClientArgs, name: Option<String>) -> anyhow::Result<()> {
    use hyperfleet_core::auth::{new_key, DEFAULT_TENANT};
    let db = args.data_dir.join("hyperfleet.db");
    if !db.is_file() {
        anyhow::bail!(
            "no database at {}: pass the daemon's data directory with --data-dir \
             (HYPERFLEET_DATA_DIR)",
            db.display()
        );
    }
    let store = hyperfleet_core::store::Store::open(&db)
        .with_context(|| format!("cannot open the database {}", db.display()))?;
    let name = name.unwrap_or_else(|| "recovery-admin".to_string());
    let (secret, rec) = new_key(&name, DEFAULT_TENANT, vec![Scope::Admin], None);
    let info = rec.to_api();
    store
        .write(move |ctx| ctx.insert_key(rec))
        .await
        .with_context(|| format!("cannot write the new key into {}", db.display()))?;
    if args.json {
        return output::json(&hyperfleet_api::CreatedKey { key: secret, info });
    }
    println!("{secret}");
    eprintln!(
        "created admin key {} for tenant '{}' in {}; the secret above is shown only once",
        info.id,
        info.tenant,
        db.display()
    );
    Ok(())
}
