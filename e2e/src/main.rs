//! `e2e local|kind`: runs the end-to-end scenarios against one target and ends with a
//! table. Exit status: 0 when every scenario passed, 1 when one failed, 2 when the target
//! could not be set up, 130 when interrupted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use e2e::kind::{KindOptions, KindTarget};
use e2e::local::{LocalOptions, LocalTarget};
use e2e::report::{ScenarioReport, table};
use e2e::scenarios::{self, Options, Scenario};
use e2e::target::{Profile, Target};

#[derive(Parser)]
#[command(about = "End-to-end scenarios for agent-server and its chart", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Server processes, redis-server, the local PostgreSQL and nginx on this machine.
    Local(LocalArgs),
    /// A kind cluster with ingress-nginx and metrics-server, the image and the chart.
    Kind(KindArgs),
}

#[derive(Args)]
struct Common {
    /// Scenarios to run (comma-separated); all of them by default.
    #[arg(long = "scenario", value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Simulated agents per scenario.
    #[arg(long, default_value_t = 60)]
    agents: usize,
    /// Server pods (on kind: the HPA's minimum).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Seconds of the low ingress read/send timeout in ingress-timeouts.
    #[arg(long, default_value_t = 3)]
    ingress_timeout: u64,
    /// Seconds allowed for connections to spread onto new pods in hpa
    /// (default: 90 locally, 240 on kind).
    #[arg(long)]
    spread_timeout: Option<u64>,
}

#[derive(Args)]
struct LocalArgs {
    #[command(flatten)]
    common: Common,
    /// Build and run the release server binary instead of the debug one.
    #[arg(long)]
    release: bool,
    /// Run this agent-server binary instead of building one from the workspace.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Superuser URL of the PostgreSQL that gets the run's database
    /// (default: TEST_POSTGRES_URL, else postgres://postgres@127.0.0.1:5432/postgres).
    #[arg(long)]
    postgres_url: Option<String>,
    #[arg(long, default_value = "nginx")]
    nginx: String,
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Pods added by the hpa scenario's explicit scale-out step.
    #[arg(long, default_value_t = 2)]
    scale_step: usize,
}

#[derive(Args)]
struct KindArgs {
    #[command(flatten)]
    common: Common,
    /// Leave the cluster running at the end (delete it with `just e2e-down`).
    #[arg(long)]
    keep: bool,
    /// Use the agent-server:e2e image already built instead of running docker build.
    #[arg(long)]
    skip_build: bool,
    #[arg(long, default_value = "agent-server-e2e")]
    cluster_name: String,
    /// The host port (on 127.0.0.1) that reaches the ingress; a free one by default. A
    /// kept cluster keeps the port it was created with.
    #[arg(long, env = "E2E_HTTP_PORT")]
    http_port: Option<u16>,
    /// Print every command, manifest, patch and wait the run would go through, in
    /// order, with the pinned versions, and exit; needs no Docker.
    #[arg(long)]
    plan: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("\ne2e: {e:#}");
            ExitCode::from(2)
        }
    }
}

enum Outcome {
    Passed,
    Failed,
    Interrupted,
}

async fn run(cli: Cli) -> Result<Outcome> {
    let repo = repo_root();
    let artifacts = target_dir(&repo).join("e2e-artifacts");
    match cli.command {
        Command::Local(args) => run_local(args, repo, artifacts).await,
        Command::Kind(args) => run_kind(args, repo, artifacts).await,
    }
}

fn options(common: &Common, default_spread: u64) -> Result<(Options, Vec<Scenario>)> {
    if common.agents == 0 || common.replicas == 0 {
        bail!("--agents and --replicas must be at least 1");
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
    let scenarios = if common.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        common.scenarios.clone()
    };
    Ok((
        Options {
            agents: common.agents,
            replicas: common.replicas,
            ingress_timeout: Duration::from_secs(common.ingress_timeout.max(1)),
            spread_timeout: Duration::from_secs(common.spread_timeout.unwrap_or(default_spread)),
            run_id: format!("e2e{run_id}"),
        },
        scenarios,
    ))
}

async fn run_local(args: LocalArgs, repo: PathBuf, artifacts: PathBuf) -> Result<Outcome> {
    let (opts, scenarios) = options(&args.common, 90)?;
    for (tool, hint) in [
        (&args.nginx, "apt-get install -y nginx"),
        (&args.redis_server, "apt-get install -y redis-server"),
    ] {
        if which(tool).is_none() {
            bail!("`{tool}` not found on PATH; install it ({hint}) or pass its path");
        }
    }
    let server_bin = match args.server_bin {
        Some(bin) => bin,
        None => build_server(&repo, args.release).await?,
    };
    let dir = artifacts.join("local");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let postgres_url = args
        .postgres_url
        .or_else(|| std::env::var("TEST_POSTGRES_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let local = LocalOptions {
        repo,
        server_bin,
        nginx_bin: args.nginx,
        redis_bin: args.redis_server,
        postgres_url,
        dir: dir.clone(),
        scale_step: args.scale_step.max(1),
    };
    println!(
        "e2e local: {} agents, {} server processes, run {}",
        opts.agents, opts.replicas, opts.run_id
    );
    let mut target = match LocalTarget::start(local, &Profile::standard(opts.replicas)).await {
        Ok(c) => c,
        Err(e) => {
            return Err(e.context(format!(
                "setting up the local target (logs in {})",
                dir.display()
            )));
        }
    };
    print_caveats(&target);
    let reports = tokio::select! {
        reports = run_scenarios(&mut target, &opts, &scenarios) => Some(reports),
        _ = tokio::signal::ctrl_c() => None,
    };
    let shutdown = target.shutdown().await;
    let Some(reports) = reports else {
        println!("\ninterrupted; the local deployment is stopped");
        return Ok(Outcome::Interrupted);
    };
    if let Err(e) = shutdown {
        println!("shutting down the local target: {e:#}");
    }
    Ok(finish("local", &reports, e2e::local::caveats(), &dir))
}

async fn run_kind(args: KindArgs, repo: PathBuf, artifacts: PathBuf) -> Result<Outcome> {
    let (opts, scenarios) = options(&args.common, 240)?;
    let kind = KindOptions {
        shared_dir: target_dir(&repo).join("e2e-kind-shared"),
        repo,
        cluster_name: args.cluster_name,
        artifacts: artifacts.join("kind"),
        skip_build: args.skip_build,
        replicas: opts.replicas,
        http_port: args.http_port,
        keep: args.keep,
    };
    if args.plan {
        print!("{}", e2e::kind::plan(kind).await?);
        return Ok(Outcome::Passed);
    }
    println!(
        "e2e kind: {} agents, {} server pods (HPA minimum), run {}",
        opts.agents, opts.replicas, opts.run_id
    );
    let dir = kind.artifacts.clone();
    let mut target = match KindTarget::setup(kind).await {
        Ok(t) => t,
        Err((e, target)) => {
            if let Some(target) = target
                && let Ok(dir) = target.collect_artifacts("setup").await
            {
                println!("logs and state of the failed setup: {}", dir.display());
            }
            return Err(e.context("setting up the kind target"));
        }
    };
    print_caveats(&target);
    let reports = tokio::select! {
        reports = run_scenarios(&mut target, &opts, &scenarios) => Some(reports),
        _ = tokio::signal::ctrl_c() => None,
    };
    let teardown = target.finish().await;
    let Some(reports) = reports else {
        println!("\ninterrupted");
        return Ok(Outcome::Interrupted);
    };
    if let Err(e) = teardown {
        println!("tearing down the kind cluster: {e:#}");
    }
    Ok(finish("kind", &reports, &[], &dir))
}

async fn run_scenarios<C: Target>(
    target: &mut C,
    opts: &Options,
    scenarios: &[Scenario],
) -> Vec<ScenarioReport> {
    let mut reports = Vec::new();
    for scenario in scenarios {
        reports.push(scenarios::run(*scenario, target, opts).await);
    }
    reports
}

fn print_caveats<C: Target>(target: &C) {
    if target.caveats().is_empty() {
        return;
    }
    println!("\nWhat only the kind target proves (`just e2e`):");
    for caveat in target.caveats() {
        println!("  - {caveat}");
    }
}

fn finish(target: &str, reports: &[ScenarioReport], caveats: &[&str], dir: &Path) -> Outcome {
    println!("{}", table(target, reports));
    if !caveats.is_empty() {
        println!("Not proven by the {target} target (run `just e2e` on a machine with Docker):");
        for caveat in caveats {
            println!("  - {caveat}");
        }
    }
    let passed = reports.iter().all(ScenarioReport::passed);
    if !passed {
        println!("\nlogs and state: {}", dir.display());
    }
    if passed {
        Outcome::Passed
    } else {
        Outcome::Failed
    }
}

/// `cargo build -p agent-server`, so the run never uses a stale binary.
async fn build_server(repo: &Path, release: bool) -> Result<PathBuf> {
    println!(
        "==> cargo build -p agent-server{}",
        if release { " --release" } else { "" }
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = tokio::process::Command::new(cargo);
    command
        .current_dir(repo)
        .args(["build", "-p", "agent-server"]);
    if release {
        command.arg("--release");
    }
    let status = command.status().await.context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p agent-server failed ({status})");
    }
    let bin = target_dir(repo)
        .join(if release { "release" } else { "debug" })
        .join("agent-server");
    if !bin.exists() {
        bail!("{} not found after the build", bin.display());
    }
    Ok(bin)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives inside the workspace")
        .to_path_buf()
}

fn target_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
}

fn which(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return Path::new(tool).exists().then(|| PathBuf::from(tool));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}
