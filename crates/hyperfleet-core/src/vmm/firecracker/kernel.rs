//! Whether a guest kernel can find Firecracker's devices.
//!
//! Firecracker attaches the disk, the network interface and the vsock as
//! virtio-mmio devices and tells the guest where they are in two ways:
//! - `virtio_mmio.device=<size>@<addr>:<irq>` entries it appends to the
//!   kernel command line, which only kernels built with
//!   `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` read (Debian's kernels are not);
//! - on x86_64 since Firecracker 1.8, ACPI: its DSDT describes each device
//!   with the hardware id `LNRO0005`, which the `virtio_mmio` driver matches
//!   (`alias acpi*:LNRO0005:*`). Verified for the binary this project
//!   installs: Firecracker 1.12.1 carries the `LNRO0005` device template.
//!
//! So a kernel with ACPI and the virtio_mmio driver finds the devices
//! without command-line support — Debian's cloud kernel, the one
//! `hyperfleet assets build` uses, among them — provided the driver is
//! built in or loadable from the asset set's initramfs. This module decides
//! that from the kernel's build configuration (the asset set's
//! `kernel.config`) or, for a kernel given with `--firecracker-kernel`,
//! from the markers the built-in drivers leave in the image.

use std::path::Path;

use crate::assets::AssetSet;

/// How a kernel's build option is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    BuiltIn,
    Module,
    Off,
}

fn option(config: &str, name: &str) -> Opt {
    let set = format!("{name}=");
    for line in config.lines() {
        if let Some(v) = line.strip_prefix(&set) {
            return match v.trim() {
                "y" => Opt::BuiltIn,
                "m" => Opt::Module,
                _ => Opt::Off,
            };
        }
    }
    Opt::Off
}

/// The drivers a Hyperfleet guest needs on Firecracker: (config option,
/// module name, what it is for).
const DRIVERS: &[(&str, &str, &str)] = &[
    (
        "CONFIG_VIRTIO_MMIO",
        "virtio_mmio",
        "the virtio-mmio transport",
    ),
    ("CONFIG_VIRTIO_BLK", "virtio_blk", "the disk"),
    ("CONFIG_VIRTIO_NET", "virtio_net", "the network interface"),
    (
        "CONFIG_VIRTIO_VSOCKETS",
        "vmw_vsock_virtio_transport",
        "the agent's vsock",
    ),
];

/// Checks a kernel from its build configuration. `loadable(module)` says
/// whether the initramfs the kernel boots with carries that module.
/// `Ok` says how the kernel will find the devices; `Err` says why it
/// cannot boot a Hyperfleet guest on Firecracker.
pub(crate) fn check_config(
    config: &str,
    loadable: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let mut missing = Vec::new();
    for (opt, module, what) in DRIVERS {
        let ok = match option(config, opt) {
            Opt::BuiltIn => true,
            Opt::Module => loadable(module),
            Opt::Off => false,
        };
        if !ok {
            missing.push(format!("{what} ({opt}, built in or module {module})"));
        }
    }
    if !missing.is_empty() {
        return Err(format!("the kernel lacks {}", missing.join(", ")));
    }
    let acpi = option(config, "CONFIG_ACPI") == Opt::BuiltIn;
    let cmdline = option(config, "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") == Opt::BuiltIn;
    match (acpi, cmdline) {
        (true, true) => Ok("finds Firecracker's devices through ACPI and the command line".into()),
        (true, false) => Ok(
            "finds Firecracker's devices through ACPI (Firecracker ≥ 1.8 \
             describes them in its DSDT)"
                .into(),
        ),
        (false, true) => Ok("finds Firecracker's devices through the command line".into()),
        (false, false) => Err("the kernel has neither ACPI (CONFIG_ACPI) nor virtio-mmio \
             command-line devices (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), so it cannot find \
             Firecracker's devices"
            .into()),
    }
}

/// Checks an uncompressed kernel image without its configuration, from what
/// built-in drivers leave in it: the `virtio_mmio.device` parameter (command
/// -line devices) and the `LNRO0005` ACPI id of the virtio_mmio driver.
/// Modules are not considered: the asset set's initramfs carries modules of
/// the asset set's kernel only.
pub(crate) fn check_image(image: &[u8]) -> Result<String, String> {
    let has = |needle: &[u8]| memchr::memmem::find(image, needle).is_some();
    let cmdline = has(b"virtio_mmio.device");
    let acpi = has(b"LNRO0005");
    match (acpi, cmdline) {
        (true, _) => Ok("has the virtio_mmio driver built in with ACPI discovery".into()),
        (false, true) => Ok("has virtio-mmio command-line devices built in".into()),
        (false, false) => Err(
            "no built-in virtio_mmio driver found in the image (neither its \
             ACPI id LNRO0005 nor its virtio_mmio.device parameter), so it cannot find \
             Firecracker's devices; use a kernel with virtio_mmio built in, or none \
             (the asset set's kernel)"
                .into(),
        ),
    }
}

/// Whether Firecracker guests can boot with `kernel` (a `--firecracker-kernel`
/// image) or, without one, with the asset set's kernel.
pub fn check(kernel: Option<&Path>, set: &AssetSet) -> Result<String, String> {
    match kernel {
        Some(k) => {
            let image = std::fs::read(k)
                .map_err(|e| format!("cannot read the kernel {}: {e}", k.display()))?;
            check_image(&image).map(|how| format!("{}: {how}", k.display()))
        }
        None => {
            let path = set.dir.join("kernel.config");
            let config = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "cannot read the asset set's kernel configuration {}: {e}",
                    path.display()
                )
            })?;
            let modules = &set.manifest.modules_load_order;
            check_config(&config, |m| modules.iter().any(|x| x.name == m)).map(|how| {
                format!(
                    "the asset set's kernel {} {how}",
                    set.manifest.kernel_release
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRIVERS_AS_MODULES: &str = "CONFIG_VIRTIO_MMIO=m\nCONFIG_VIRTIO_BLK=m\n\
        CONFIG_VIRTIO_NET=m\nCONFIG_VIRTIO_VSOCKETS=m\n";

    #[test]
    fn debians_cloud_kernel_finds_the_devices_through_acpi_with_its_modules() {
        let config = format!(
            "{DRIVERS_AS_MODULES}CONFIG_ACPI=y\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n"
        );
        let how = check_config(&config, |_| true).unwrap();
        assert!(how.contains("ACPI"), "{how}");
        // Without the modules in the initramfs it cannot.
        let err = check_config(&config, |m| m != "virtio_mmio").unwrap_err();
        assert!(err.contains("virtio_mmio"), "{err}");
    }

    #[test]
    fn a_kernel_without_acpi_needs_command_line_devices() {
        let config = format!("{DRIVERS_AS_MODULES}# CONFIG_ACPI is not set\n");
        let err = check_config(&config, |_| true).unwrap_err();
        assert!(err.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"), "{err}");
        let config = format!("{config}CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n");
        assert!(check_config(&config, |_| true)
            .unwrap()
            .contains("command line"));
    }

    #[test]
    fn every_missing_driver_is_named() {
        let err = check_config("CONFIG_ACPI=y\nCONFIG_VIRTIO_MMIO=y\n", |_| false).unwrap_err();
        for what in ["disk", "network interface", "vsock"] {
            assert!(err.contains(what), "{err}");
        }
        assert!(!err.contains("virtio-mmio transport"), "{err}");
    }

    #[test]
    fn an_image_is_judged_by_its_built_in_markers() {
        let mut image = vec![0u8; 4096];
        check_image(&image).expect_err("a blank image has no markers");
        image[100..108].copy_from_slice(b"LNRO0005");
        assert!(check_image(&image).unwrap().contains("ACPI"));
        let mut image = vec![0u8; 4096];
        image[7..25].copy_from_slice(b"virtio_mmio.device");
        assert!(check_image(&image).unwrap().contains("command-line"));
    }
}
