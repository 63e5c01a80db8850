//! `hyperfleet keys …`: API key management through the API (admin scope).

use anyhow::Context;
use hyperfleet_api::{CreateKeyRequest, Scope};
use hyperfleet_client::Client;

use crate::cli::{ClientArgs, KeysCmd};
use crate::output;

pub async fn run(args: &ClientArgs, cmd: KeysCmd) -> anyhow::Result<()> {
    let c = Client::new(&args.url, crate::serve::api_key(args)).context("bad server URL")?;
    match cmd {
        KeysCmd::Create {
            name,
            scopes,
            tenant,
            expires_in,
        } => {
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
