//! `hyperfleet assets build|show`.

use anyhow::{bail, Context};
use hyperfleet_core::assets::{self, AssetSet};

use crate::cli::{AssetsCmd, ClientArgs};
use crate::progress::Progress;

pub(crate) fn run(args: &ClientArgs, cmd: AssetsCmd) -> anyhow::Result<()> {
    let root = assets::assets_root(&args.data_dir);
    match cmd {
        AssetsCmd::Build { agent } => {
            let agent = match agent {
                Some(a) => a,
                None => std::env::current_exe()
                    .context("locating this binary")?
                    .with_file_name("hyperfleet-agent"),
            };
            if !agent.is_file() {
                bail!(
                    "the guest agent {} does not exist; build it with scripts/build-agent.sh or pass --agent",
                    agent.display()
                );
            }
            if !assets::is_static_elf(&agent)? {
                bail!(
                    "{} is dynamically linked; the agent runs as PID 1 in a minimal initramfs and must be static (scripts/build-agent.sh)",
                    agent.display()
                );
            }
            let t0 = std::time::Instant::now();
            let progress = Progress::spinner(args.json, "building the guest assets");
            let set = match assets::build(&args.data_dir, Some(&agent), |line| progress.line(line))
            {
                Ok(set) => set,
                Err(e) => {
                    progress.fail();
                    return Err(e.into());
                }
            };
            drop(progress);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"id": set.id, "dir": set.dir, "kernel_release": set.manifest.kernel_release})
                );
            } else {
                println!(
                    "guest assets {} ready in {} ({:.1} s); {}/current points at it",
                    set.id,
                    set.dir.display(),
                    t0.elapsed().as_secs_f64(),
                    root.display()
                );
            }
            Ok(())
        }
        AssetsCmd::Show { verify } => {
            let set = AssetSet::load(&root.join("current"))?;
            if verify {
                set.verify()?;
            }
            if args.json {
                let files: Vec<_> = set
                    .manifest
                    .assets
                    .iter()
                    .map(|a| serde_json::json!({"file": a.file, "kind": a.kind, "sha256": a.sha256, "size": a.size}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"id": set.id, "dir": set.dir, "kernel_release": set.manifest.kernel_release, "verified": verify, "files": files})
                );
                return Ok(());
            }
            println!("id       {}", set.id);
            println!("dir      {}", set.dir.display());
            println!("kernel   {}", set.manifest.kernel_release);
            if let Some(a) = &set.manifest.agent {
                println!("agent    {} ({})", a.file, &a.sha256[..16]);
            }
            for a in &set.manifest.assets {
                println!("  {:<16} {:>12} bytes  sha256 {}", a.file, a.size, a.sha256);
            }
            if verify {
                println!("all checksums verified");
            }
            Ok(())
        }
    }
}
