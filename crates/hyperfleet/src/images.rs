//! `hyperfleet images …`: OCI images through the API.

use std::time::Duration;

use anyhow::Context;
use hyperfleet_api::{Image, ImageStatus, PullImageRequest, RegistryAuth};
use hyperfleet_client::Client;

use crate::cli::{ClientArgs, ImagesCmd};
use crate::output;

pub(crate) async fn run(args: &ClientArgs, cmd: ImagesCmd) -> anyhow::Result<()> {
    let c = Client::new(&args.url, crate::serve::api_key(args)).context("bad server URL")?;
    let img = match cmd {
        ImagesCmd::Pull {
            reference,
            insecure,
            username,
            no_wait,
        } => {
            let auth = match username {
                Some(username) => Some(RegistryAuth::Basic {
                    username,
                    password: std::env::var("HYPERFLEET_REGISTRY_PASSWORD")
                        .context("--username needs HYPERFLEET_REGISTRY_PASSWORD")?,
                }),
                None => None,
            };
            let mut img = c
                .pull_image(&PullImageRequest {
                    reference,
                    insecure,
                    auth,
                })
                .await?;
            let mut shown = String::new();
            while !no_wait && img.status == ImageStatus::Pulling {
                tokio::time::sleep(Duration::from_millis(250)).await;
                img = c.get_image(&img.id).await?;
                let (done, total) = img
                    .layers
                    .iter()
                    .fold((0, 0), |(d, t), l| (d + l.done, t + l.size));
                let line = format!("{}: {done}/{total} bytes", img.id);
                if !args.json && line != shown {
                    eprintln!("{line}");
                    shown = line;
                }
            }
            if img.status == ImageStatus::Failed {
                anyhow::bail!(
                    "image {} failed: {}",
                    img.id,
                    img.error.as_deref().unwrap_or("unknown")
                );
            }
            img
        }
        ImagesCmd::Import { file } => {
            let f = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
            c.import_image(body).await?
        }
        ImagesCmd::List => {
            let list = c.list_images().await?;
            if args.json {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list.images.iter().map(row).collect();
            output::table(&["ID", "STATUS", "REF", "DIGEST", "SIZE"], &rows);
            return Ok(());
        }
        ImagesCmd::Get { id } => c.get_image(&id).await?,
        ImagesCmd::Delete { id } => {
            c.delete_image(&id).await?;
            eprintln!("deleted {id}");
            return Ok(());
        }
    };
    if args.json {
        return output::json(&img);
    }
    output::table(&["ID", "STATUS", "REF", "DIGEST", "SIZE"], &[row(&img)]);
    Ok(())
}

fn row(i: &Image) -> Vec<String> {
    vec![
        i.id.clone(),
        format!("{:?}", i.status).to_lowercase(),
        i.reference.clone().unwrap_or_else(|| "(import)".into()),
        i.digest
            .as_deref()
            .map(|d| d.chars().take(19).collect())
            .unwrap_or_default(),
        i.size_bytes.map(|s| s.to_string()).unwrap_or_default(),
    ]
}
