//! Serving both APIs, in the clear or over TLS (rustls with the ring provider).

use std::future::Future;
use std::path::Path;

use anyhow::{Context, Result};

/// A certificate chain and its private key, read from PEM files once at start.
#[derive(Clone)]
pub(crate) struct Tls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl Tls {
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Tls> {
        let cert_pem = std::fs::read(cert)
            .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
        let key_pem =
            std::fs::read(key).with_context(|| format!("reading the TLS key {}", key.display()))?;
        // Check both now, so that a bad file stops the daemon at start with a clear message.
        tonic::transport::Identity::from_pem(&cert_pem, &key_pem);
        if !String::from_utf8_lossy(&cert_pem).contains("-----BEGIN CERTIFICATE-----") {
            anyhow::bail!("{} holds no PEM certificate", cert.display());
        }
        if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
            anyhow::bail!("{} holds no PEM private key", key.display());
        }
        Ok(Tls { cert_pem, key_pem })
    }
}

/// Serves the HTTP API until `stop` resolves.
pub(crate) async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<Tls>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    match tls {
        None => axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
            .context("serving HTTP"),
        Some(tls) => {
            let config = axum_server::tls_rustls::RustlsConfig::from_pem(tls.cert_pem, tls.key_pem)
                .await
                .context("the TLS certificate or key is not usable")?;
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                stop.await;
                h.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
            });
            let std_listener = listener.into_std().context("the HTTP listener")?;
            axum_server::from_tcp_rustls(std_listener, config)
                .handle(handle)
                .serve(router.into_make_service())
                .await
                .context("serving HTTPS")
        }
    }
}

/// Serves the gRPC API until `stop` resolves.
pub(crate) async fn serve_grpc(
    listener: tokio::net::TcpListener,
    app: std::sync::Arc<super::App>,
    tls: Option<Tls>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(tls.cert_pem, tls.key_pem),
            ))
            .context("the TLS certificate or key is not usable for gRPC")?;
    }
    builder
        .add_service(super::grpc::service(app))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        )
        .await
        .context("serving gRPC")
}
