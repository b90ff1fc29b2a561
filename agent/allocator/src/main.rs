//! vnet-allocator: cluster mode's allocator (see the library and docs/cluster-allocator.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use vnet_allocator::{BucketSettings, Settings};
use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig};

mod http;

#[derive(Debug, Parser)]
#[command(name = "vnet-allocator", version, about)]
struct Args {
    /// ARM base URL (empty: Azure's public cloud).
    #[arg(long, env = "VNET_ALLOCATOR_ARM_ENDPOINT", default_value = "")]
    arm_endpoint: String,
    /// IMDS base URL (the managed identity credential's token endpoint lives there).
    #[arg(
        long,
        env = "VNET_ALLOCATOR_IMDS_ENDPOINT",
        default_value = vnet_cloud::azure::DEFAULT_IMDS_ENDPOINT
    )]
    imds_endpoint: String,
    /// managed_identity | workload_identity | client_secret | none.
    #[arg(
        long,
        env = "VNET_ALLOCATOR_CREDENTIAL",
        default_value = "workload_identity"
    )]
    credential: String,
    #[arg(long, env = "VNET_ALLOCATOR_CLIENT_ID", default_value = "")]
    client_id: String,
    #[arg(long, env = "VNET_ALLOCATOR_TENANT_ID", default_value = "")]
    tenant_id: String,
    #[arg(long, env = "VNET_ALLOCATOR_CLIENT_SECRET_FILE", default_value = "")]
    client_secret_file: String,
    /// vnet-mockcloud (the lab): plain http:// ARM allowed, and this static test token sent.
    #[arg(long, env = "VNET_ALLOCATOR_MOCK_TOKEN")]
    mock_token: Option<String>,
    /// The namespace of the Lease (the pod's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    namespace: String,
    /// This replica's name in the Lease (the pod's name, from the downward API).
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
    #[arg(long, default_value = "vnet-cni-allocator")]
    lease_name: String,
    /// Outside a cluster: the API server and credentials of this kubeconfig.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// /healthz and /metrics.
    #[arg(long, default_value = "127.0.0.1:9465")]
    listen: SocketAddr,
    /// The principal's ARM reads bucket as SIZE/REFILL_PER_SEC (ARM: 250/25; a margin below).
    #[arg(long, default_value = "240/24.5")]
    reads_bucket: String,
    /// The writes bucket (ARM: 200/10).
    #[arg(long, default_value = "190/9.8")]
    writes_bucket: String,
    #[arg(long, default_value_t = 128)]
    max_in_flight: usize,
    /// text | json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn bucket(text: &str, flag: &str) -> anyhow::Result<BucketSettings> {
    let (size, rate) = text
        .split_once('/')
        .with_context(|| format!("{flag} {text:?}: want SIZE/REFILL_PER_SEC, e.g. 240/24.5"))?;
    Ok(BucketSettings {
        size: size
            .trim()
            .parse()
            .with_context(|| format!("{flag}: bad size {size:?}"))?,
        refill_per_sec: rate
            .trim()
            .parse()
            .with_context(|| format!("{flag}: bad refill {rate:?}"))?,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format.as_str() {
        "json" => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        "text" => tracing_subscriber::fmt().with_env_filter(filter).init(),
        other => bail!("--log-format {other:?}: want text or json"),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let credential = match &args.mock_token {
        Some(token) => CredentialConfig::StaticToken {
            token: token.clone(),
        },
        None => CredentialConfig::from_settings(
            &args.credential,
            &args.client_id,
            &args.tenant_id,
            &args.client_secret_file,
        )?,
    };
    let config = if args.mock_token.is_some() {
        AzureConfig::mock(&args.arm_endpoint, &args.imds_endpoint, credential)
    } else {
        AzureConfig::new(&args.arm_endpoint, &args.imds_endpoint, credential)
    };
    let cloud = Arc::new(AzureProvider::new(vnet_allocator::cloud_config(config))?);
    let settings = Settings {
        namespace: args.namespace,
        holder: args.pod_name,
        lease_name: args.lease_name,
        reads: bucket(&args.reads_bucket, "--reads-bucket")?,
        writes: bucket(&args.writes_bucket, "--writes-bucket")?,
        max_in_flight: args.max_in_flight,
        ..Settings::default()
    };
    let counters = settings.counters.clone();

    let source = vnet_kube::ClientSource::from_env(args.kubeconfig.as_deref());
    let Some(client) = vnet_kube::client(&source)
        .await
        .context("cannot build the Kubernetes client")?
    else {
        bail!(
            "no Kubernetes API server: run in a cluster (KUBERNETES_SERVICE_HOST) or pass --kubeconfig"
        );
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listener_task = tokio::spawn(vnet_kube::listener::serve(
        listener,
        http::router(counters, cloud.clone()),
    ));

    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: no new jobs; the ones under way finish");
        let _ = stop.send(true);
    });
    let result = vnet_allocator::run(client, cloud, settings, shutdown).await;
    listener_task.abort();
    // Give the lease release a moment to be sent.
    tokio::time::sleep(Duration::from_millis(10)).await;
    result.map_err(Into::into)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
