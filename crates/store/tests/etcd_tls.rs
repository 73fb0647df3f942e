//! The etcd backend over TLS, against a real etcd that wants client certificates
//! (`--client-cert-auth`) and, in the second test, a login: the suite passes with the right
//! certificate, and etcd refuses a client without one, with one from another CA, one that does
//! not trust etcd's CA, a wrong password, and a user outside its namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bulkhead_netlab::TempDir;
use bulkhead_netlab::etcd::{Etcd as Server, TestPki, etcd_ok};
use bulkhead_store::etcd::Access;
use bulkhead_store::{Etcd, Op, Store, suite};

fn access(pki: &TestPki) -> Access {
    Access::certificate(&pki.ca_pem, &pki.client.0, &pki.client.1)
}

/// Connects and also writes: a refusal must not depend on which call comes first.
async fn try_use(spec: &str, a: &Access) -> Result<(), String> {
    try_use_as(spec, a).await.map_err(|e| e.to_string())
}

async fn try_use_as(spec: &str, a: &Access) -> Result<(), bulkhead_store::Error> {
    let s = Etcd::connect_with(spec, "/bulkhead/", a).await?;
    s.txn(&[], &[Op::Put("probe".into(), b"1".to_vec())])
        .await?;
    Ok(())
}

/// A refusal the controller stops on at start instead of retrying forever.
fn is_refused(r: Result<(), bulkhead_store::Error>) -> bool {
    matches!(r, Err(bulkhead_store::Error::Refused(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_suite_passes_and_a_client_without_a_certificate_is_refused() {
    if !etcd_ok() {
        return;
    }
    let dir = TempDir::new("etcd-tls");
    let pki = TestPki::generate(dir.path());
    let server = Server::start_tls(&pki.server);
    let spec = server.spec();
    assert!(spec.starts_with("etcds://"), "{spec}");

    let s = Etcd::connect_with(&spec, "/bulkhead-test/", &access(&pki))
        .await
        .unwrap();
    suite::run_all(Arc::new(s.clone()) as Arc<dyn Store>, "t").await;
    let health = s.health().await;
    assert!(health[0].1.is_ok(), "{health:?}");

    // No certificate: the TLS handshake is refused.
    let no_cert = Access {
        identity: None,
        ..access(&pki)
    };
    // (Under TLS 1.3 the server checks the client's certificate after the client's side of the
    // handshake is done, so the client sees the connection closed, not a refusal: it is
    // retried like an unreachable etcd, and logged with the transport error.)
    let e = try_use(&spec, &no_cert).await.unwrap_err();
    assert!(e.contains("etcd"), "{e}");
    // A certificate from another CA: refused too.
    let stranger = Access {
        identity: Some((
            pki.stranger.0.clone().into_bytes(),
            pki.stranger.1.clone().into_bytes(),
        )),
        ..access(&pki)
    };
    try_use(&spec, &stranger).await.unwrap_err();
    // A client that does not trust the server's CA does not talk to it.
    let (other_ca, _) = {
        let d = TempDir::new("etcd-tls-other");
        let o = TestPki::generate(d.path());
        (o.ca_pem, d)
    };
    let distrust = Access {
        ca: Some(other_ca.into_bytes()),
        ..access(&pki)
    };
    // (Seen as a failed connection, not always as a refusal: the client hangs up.)
    try_use(&spec, &distrust).await.unwrap_err();
    // Plain etcd:// to the TLS port: nothing.
    let plain = spec.replace("etcds://", "etcd://");
    try_use(&plain, &Access::default()).await.unwrap_err();
    // And nothing reached the store from any of them.
    assert!(s.get("probe").await.unwrap().is_none());
    let raw = Etcd::connect_with(&spec, "/bulkhead/", &access(&pki))
        .await
        .unwrap();
    assert!(raw.get("probe").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_auth_a_wrong_password_is_refused() {
    if !etcd_ok() {
        return;
    }
    let dir = TempDir::new("etcd-auth");
    let pki = TestPki::generate(dir.path());
    let server = Server::start_tls(&pki.server);
    let spec = server.spec();

    // What `etcdctl role add / user add / auth enable` does: a root user (required to enable
    // auth), and a `bulkhead` user that may use /bulkhead/ only.
    let a = access(&pki);
    let opts = etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(a.ca.clone().unwrap()))
            .identity(etcd_client::Identity::from_pem(
                &pki.client.0,
                &pki.client.1,
            )),
    );
    let ep = spec.replace("etcds://", "https://");
    let mut admin = etcd_client::Client::connect([ep.as_str()], Some(opts))
        .await
        .unwrap();
    admin.role_add("root").await.unwrap();
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("bulkhead").await.unwrap();
    admin
        .role_grant_permission(
            "bulkhead",
            etcd_client::Permission::read_write("/bulkhead/").with_prefix(),
        )
        .await
        .unwrap();
    admin.user_add("bulkhead", "s3cret", None).await.unwrap();
    admin.user_grant_role("bulkhead", "bulkhead").await.unwrap();
    admin.auth_enable().await.unwrap();

    let login = |user: &str, pw: &str| Access {
        user: Some((user.into(), pw.into())),
        ..access(&pki)
    };
    let s = Etcd::connect_with(&spec, "/bulkhead/", &login("bulkhead", "s3cret"))
        .await
        .unwrap();
    suite::revisions_and_range(&s, "t").await;
    suite::compare_and_swap(&s, "u").await;
    suite::watch_in_order(&s, "w").await;
    suite::held_keys(&s, "h").await;

    let e = try_use(&spec, &login("bulkhead", "wrong"))
        .await
        .unwrap_err();
    assert!(e.contains("authentication failed"), "{e}");
    let r = try_use_as(&spec, &login("bulkhead", "wrong")).await;
    assert!(is_refused(r.clone()), "{r:?}");
    // Without a password, etcd takes the client certificate's CN as the user (documented etcd
    // behaviour): "bulkhead" here. So a certificate's CN must name the user it may act as.
    try_use(&spec, &access(&pki)).await.unwrap();
    // The right user outside its namespace: refused.
    let e = Etcd::connect_with(&spec, "/elsewhere/", &login("bulkhead", "s3cret"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("permission denied"), "{e}");
    let r = Etcd::connect_with(&spec, "/elsewhere/", &login("bulkhead", "s3cret"))
        .await
        .map(drop);
    assert!(is_refused(r.clone()), "{r:?}");
}
