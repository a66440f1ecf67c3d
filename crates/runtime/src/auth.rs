//! Bearer-token authentication with scopes, as a tower layer in front of every gRPC service.
//!
//! Health checking and reflection are open; every other method needs `authorization: Bearer
//! <token>`. A missing or unknown token is UNAUTHENTICATED; a known token without the method's
//! scope is PERMISSION_DENIED. Tokens are compared as SHA-256 digests in constant time against
//! every configured token (no early exit), and are never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use crate::settings::TokenConfig;

/// The client a request was authenticated as; inserted into request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The configured client name of the token.
    pub client: String,
}

struct Credential {
    digest: [u8; 32],
    client: String,
    scopes: Vec<String>,
}

/// The set of accepted tokens and the scope each gRPC method needs.
#[derive(Clone)]
pub struct Authenticator {
    credentials: Arc<Vec<Credential>>,
    method_scopes: Arc<HashMap<String, &'static str>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.credentials.len())
            .field("methods", &self.method_scopes.len())
            .finish()
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token, or one that matches no configured token.
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    /// The token is valid but lacks the scope the method needs.
    #[error("client `{client}` lacks scope `{scope}`")]
    PermissionDenied {
        /// The client name of the token.
        client: String,
        /// The scope the method needs.
        scope: &'static str,
    },
    /// The method is not known to any mounted service; tonic answers UNIMPLEMENTED.
    #[error("unknown method")]
    UnknownMethod,
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => tonic::Status::unauthenticated(e.to_string()),
            AuthError::PermissionDenied { .. } => tonic::Status::permission_denied(e.to_string()),
            AuthError::UnknownMethod => tonic::Status::unimplemented("unknown method"),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Paths that never need a token: health checks (probes) and reflection (discovery).
fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// Does `granted` (`profiles:read`, `profiles:*`, `*`) cover `needed` (`profiles:read`)?
/// `profiles:admin` also covers `profiles:read` and `profiles:write`, and `write` covers `read`.
pub fn scope_covers(granted: &str, needed: &str) -> bool {
    if granted == "*" || granted == needed {
        return true;
    }
    let (Some((g_res, g_act)), Some((n_res, n_act))) =
        (granted.split_once(':'), needed.split_once(':'))
    else {
        return false;
    };
    if g_res != n_res {
        return false;
    }
    matches!(
        (g_act, n_act),
        ("*", _) | ("admin", "write" | "read") | ("write", "read")
    )
}

impl Authenticator {
    /// Builds an authenticator from configured tokens and the `(method path, scope)` pairs of
    /// the mounted services, e.g. `("/clientele.v1.ProfileService/GetProfile", "profiles:read")`.
    pub fn new<'a>(
        tokens: &[TokenConfig],
        method_scopes: impl IntoIterator<Item = (&'a str, &'static str)>,
    ) -> Self {
        let credentials = tokens
            .iter()
            .map(|t| Credential {
                digest: digest(&t.token),
                client: t.client.clone(),
                scopes: t.scopes.clone(),
            })
            .collect();
        Self {
            credentials: Arc::new(credentials),
            method_scopes: Arc::new(
                method_scopes
                    .into_iter()
                    .map(|(m, s)| (m.to_string(), s))
                    .collect(),
            ),
        }
    }

    /// Checks one call: `path` is the HTTP/2 path (`/pkg.Service/Method`), `authorization` the
    /// raw header value. Returns the caller, or `None` for open paths.
    pub fn check(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
    ) -> Result<Option<Caller>, AuthError> {
        if is_open(path) {
            return Ok(None);
        }
        let Some(scope) = self.method_scopes.get(path).copied() else {
            return Err(AuthError::UnknownMethod);
        };
        let token = authorization
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(AuthError::Unauthenticated)?;
        let presented = digest(token);
        let mut found: Option<&Credential> = None;
        for cred in self.credentials.iter() {
            if bool::from(cred.digest.ct_eq(&presented)) {
                found = Some(cred);
            }
        }
        let cred = found.ok_or(AuthError::Unauthenticated)?;
        if cred.scopes.iter().any(|g| scope_covers(g, scope)) {
            Ok(Some(Caller {
                client: cred.client.clone(),
            }))
        } else {
            Err(AuthError::PermissionDenied {
                client: cred.client.clone(),
                scope,
            })
        }
    }
}

/// Tower layer that enforces [`Authenticator`] on every request.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl AuthLayer {
    /// Wraps services with the given authenticator.
    pub fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// Service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
}

impl<S, B, RB> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<RB>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.auth.check(req.uri().path(), header) {
            Ok(caller) => {
                if let Some(c) = caller {
                    req.extensions_mut().insert(c);
                }
                futures::future::Either::Left(self.inner.call(req))
            }
            Err(AuthError::UnknownMethod) => futures::future::Either::Left(self.inner.call(req)),
            Err(e) => {
                tracing::debug!(path = req.uri().path(), error = %e, "call refused");
                let (parts, ()) = tonic::Status::from(e).into_http::<()>().into_parts();
                let resp = http::Response::from_parts(parts, RB::default());
                futures::future::Either::Right(std::future::ready(Ok(resp)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(
            &[
                TokenConfig {
                    client: "reader".into(),
                    token: "r-token".into(),
                    scopes: vec!["profiles:read".into()],
                },
                TokenConfig {
                    client: "ops".into(),
                    token: "o-token".into(),
                    scopes: vec!["profiles:admin".into()],
                },
            ],
            [
                ("/clientele.v1.ProfileService/GetProfile", "profiles:read"),
                (
                    "/clientele.v1.ProfileService/EraseProfile",
                    "profiles:admin",
                ),
            ],
        )
    }

    #[test]
    fn a_missing_token_is_unauthenticated() {
        let r = auth().check("/clientele.v1.ProfileService/GetProfile", None);
        assert_eq!(r, Err(AuthError::Unauthenticated));
    }

    #[test]
    fn an_unknown_token_is_unauthenticated() {
        let r = auth().check(
            "/clientele.v1.ProfileService/GetProfile",
            Some(b"Bearer nope"),
        );
        assert_eq!(r, Err(AuthError::Unauthenticated));
    }

    #[test]
    fn a_token_without_the_scope_is_permission_denied() {
        let r = auth().check(
            "/clientele.v1.ProfileService/EraseProfile",
            Some(b"Bearer r-token"),
        );
        assert!(matches!(
            r,
            Err(AuthError::PermissionDenied {
                scope: "profiles:admin",
                ..
            })
        ));
    }

    #[test]
    fn admin_scope_covers_reads_and_health_needs_no_token() {
        let a = auth();
        let r = a.check(
            "/clientele.v1.ProfileService/GetProfile",
            Some(b"Bearer o-token"),
        );
        assert_eq!(r.ok().flatten().map(|c| c.client), Some("ops".to_string()));
        assert_eq!(a.check("/grpc.health.v1.Health/Check", None), Ok(None));
    }

    #[test]
    fn scope_wildcards() {
        assert!(scope_covers("*", "ingest:write"));
        assert!(scope_covers("ingest:*", "ingest:write"));
        assert!(!scope_covers("ingest:*", "profiles:read"));
        assert!(scope_covers("profiles:write", "profiles:read"));
        assert!(!scope_covers("profiles:read", "profiles:write"));
        assert!(!scope_covers("profiles:write", "profiles:admin"));
    }
}
