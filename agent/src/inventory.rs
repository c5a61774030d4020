//! The host's inventory, read with `sysinfo` (no parsing of shell output), plus GPUs from
//! `nvidia-smi` when it is installed. A JSON document; sizes in bytes, times in seconds.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

/// The host name as the operating system reports it.
pub fn hostname() -> Option<String> {
    System::host_name()
}

/// Reads everything but GPUs (blocking: call it off the async runtime).
fn host(labels: &[String]) -> Value {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::everything()),
    );
    let cpus = sys.cpus();
    let model = cpus
        .first()
        .map(|c| c.brand().trim().to_string())
        .filter(|b| !b.is_empty());
    let disks: Vec<Value> = Disks::new_with_refreshed_list()
        .list()
        .iter()
        .map(|d| {
            json!({
                "name": d.name().to_string_lossy(),
                "mount_point": d.mount_point().to_string_lossy(),
                "file_system": d.file_system().to_string_lossy(),
                "kind": format!("{:?}", d.kind()),
                "total_bytes": d.total_space(),
                "available_bytes": d.available_space(),
                "removable": d.is_removable(),
            })
        })
        .collect();
    let networks = Networks::new_with_refreshed_list();
    let mut interfaces: Vec<Value> = networks
        .iter()
        .map(|(name, data)| {
            let addresses: Vec<String> = data
                .ip_networks()
                .iter()
                .map(|n| format!("{}/{}", n.addr, n.prefix))
                .collect();
            json!({
                "name": name,
                "mac": data.mac_address().to_string(),
                "addresses": addresses,
            })
        })
        .collect();
    interfaces.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "hostname": System::host_name(),
        "agent_version": crate::VERSION,
        "labels": labels,
        "os": {
            "name": System::name(),
            "version": System::os_version(),
            "long_version": System::long_os_version(),
            "distribution_id": System::distribution_id(),
            "kernel": System::kernel_version(),
            "arch": System::cpu_arch(),
        },
        "cpu": {
            "model": model,
            "count": cpus.len(),
            "physical_cores": System::physical_core_count(),
        },
        "memory": {
            "total_bytes": sys.total_memory(),
            "available_bytes": sys.available_memory(),
            "swap_total_bytes": sys.total_swap(),
        },
        "disks": disks,
        "network_interfaces": interfaces,
        "uptime_seconds": System::uptime(),
        "boot_time": System::boot_time(),
    })
}

/// Fields `nvidia-smi --query-gpu` reports, in order.
const GPU_FIELDS: &[&str] = &[
    "name",
    "uuid",
    "driver_version",
    "memory.total",
    "pci.bus_id",
];

/// GPUs from `nvidia-smi`, or `None` where it is not installed or fails.
async fn gpus() -> Option<Vec<Value>> {
    let run = tokio::process::Command::new("nvidia-smi")
        .arg(format!("--query-gpu={}", GPU_FIELDS.join(",")))
        .arg("--format=csv,noheader,nounits")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .ok()?
        .ok()
        .filter(|o| o.status.success())?;
    Some(parse_gpus(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_gpus(csv: &str) -> Vec<Value> {
    csv.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split(',').map(str::trim).collect();
            let col = |i: usize| cols.get(i).copied().unwrap_or_default();
            json!({
                "name": col(0),
                "uuid": col(1),
                "driver_version": col(2),
                // nvidia-smi reports MiB.
                "memory_total_bytes": col(3).parse::<u64>().ok().map(|mib| mib * 1024 * 1024),
                "pci_bus_id": col(4),
            })
        })
        .collect()
}

/// The inventory document.
pub async fn collect(labels: Vec<String>) -> Value {
    let mut doc = tokio::task::spawn_blocking(move || host(&labels))
        .await
        .unwrap_or_else(|_| json!({}));
    if let Some(gpus) = gpus().await {
        doc["gpus"] = gpus.into();
    }
    doc["collected_at"] = crate::journal::now_ms().into();
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_csv_becomes_one_object_per_gpu() {
        let csv = "NVIDIA A100-SXM4-40GB, GPU-5d1c, 535.104.05, 40960, 00000000:07:00.0\n";
        let gpus = parse_gpus(csv);
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0]["name"], "NVIDIA A100-SXM4-40GB");
        assert_eq!(gpus[0]["memory_total_bytes"], 40960u64 * 1024 * 1024);
    }

    #[tokio::test]
    async fn the_inventory_describes_this_host() {
        let doc = collect(vec!["canary".into()]).await;
        assert!(doc["cpu"]["count"].as_u64().unwrap() >= 1);
        assert!(doc["memory"]["total_bytes"].as_u64().unwrap() > 0);
        assert!(doc["os"]["kernel"].is_string());
        assert!(
            doc["network_interfaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["name"] == "lo")
        );
        assert_eq!(doc["labels"], json!(["canary"]));
    }
}
