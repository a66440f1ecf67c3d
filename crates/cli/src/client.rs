//! Talking to the server: global connection options, finding a token, building the
//! ProfileService client, and turning gRPC failures into plain error messages.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clientele_proto::v1::profile_service_client::ProfileServiceClient;
use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The ProfileService client every command uses (bearer token + trace context on each call).
pub type ProfileClient = ProfileServiceClient<InterceptedService<Channel, ClientInterceptor>>;

/// Where the server's development token lives when `CLIENTELE_DATA_DIR` is unset (relative to
/// the working directory, like the server's own default `data_dir`).
pub const DEFAULT_DATA_DIR: &str = "clientele-data";

/// Options every command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionOptions {
    /// Server address.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CLIENTELE_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// Bearer token. When unset, the development token a local `clienteled` writes to
    /// `$CLIENTELE_DATA_DIR/dev-token` (default `clientele-data/dev-token`) is used.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CLIENTELE_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Output format.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value = "human"
    )]
    pub output: OutputFormat,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Readable text.
    Human,
    /// JSON (protobuf field names, enum names, RFC 3339 times).
    Json,
}

/// Writes `text` to standard output. A closed pipe (`clientele … | head`) is not an error:
/// the reader has what it wanted.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The token to present: `explicit` (from `--token` / `CLIENTELE_TOKEN`) when given and not
/// blank, else the trimmed contents of `<data_dir>/dev-token`. Fails with instructions on how
/// to get a token when neither exists.
pub fn resolve_token(explicit: Option<&str>, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(token) = explicit.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(token.to_string());
    }
    let path = data_dir.join("dev-token");
    match std::fs::read_to_string(&path) {
        Ok(contents) if !contents.trim().is_empty() => Ok(contents.trim().to_string()),
        Ok(_) => bail!(
            "the development token file {} is empty; pass --token or set CLIENTELE_TOKEN",
            path.display()
        ),
        Err(_) => bail!(
            "no token: pass --token or set CLIENTELE_TOKEN. A local `clienteled` with no tokens \
             configured writes a development token to <data_dir>/dev-token; {} does not exist, \
             so run this from the server's working directory or set CLIENTELE_DATA_DIR to its \
             data directory",
            path.display()
        ),
    }
}

/// The data directory holding the development token: `CLIENTELE_DATA_DIR`, else
/// [`DEFAULT_DATA_DIR`].
pub fn data_dir_from_env() -> PathBuf {
    std::env::var_os("CLIENTELE_DATA_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from)
}

/// A channel to the server of `options` that adds the bearer token and trace context to
/// every call. Connects lazily: an unreachable server shows up as an `UNAVAILABLE` status on
/// the first call.
pub fn authed_channel(
    options: &ConnectionOptions,
) -> anyhow::Result<InterceptedService<Channel, ClientInterceptor>> {
    let token = resolve_token(options.token.as_deref(), &data_dir_from_env())?;
    let interceptor = ClientInterceptor::new(Some(&token))
        .map_err(|s| anyhow::anyhow!("invalid token: {}", s.message()))?;
    let channel = lazy_channel(&options.endpoint)
        .with_context(|| format!("invalid endpoint `{}`", options.endpoint))?;
    Ok(InterceptedService::new(channel, interceptor))
}

/// A ProfileService client for `options`.
pub fn profile_client(options: &ConnectionOptions) -> anyhow::Result<ProfileClient> {
    Ok(ProfileServiceClient::new(authed_channel(options)?))
}

/// The canonical upper-case name of a gRPC status code (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// True when `status` comes from the client failing to reach the server rather than from the
/// server answering (tonic reports connection failures as `UNAVAILABLE` with a transport
/// error as the source).
pub fn is_connection_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && (std::error::Error::source(status).is_some()
            || status.message().contains("connect")
            || status.message().contains("transport error"))
}

/// The message printed after `error: ` for a failed call: `CODE: message`, plus what to do
/// when the server could not be reached or refused the token.
pub fn describe_status(status: &tonic::Status, endpoint: &str) -> String {
    if is_connection_failure(status) {
        return format!(
            "could not reach the Clientele server at {endpoint} ({}: {}).\n\
             Start it with `make run` or `clienteled`, or point --endpoint / \
             CLIENTELE_ENDPOINT at a running server.",
            code_name(status.code()),
            status.message()
        );
    }
    let mut text = format!("{}: {}", code_name(status.code()), status.message());
    match status.code() {
        tonic::Code::Unauthenticated => text.push_str(
            "\nThe server did not accept the token: pass --token / CLIENTELE_TOKEN, or set \
             CLIENTELE_DATA_DIR to the data directory of the server you are talking to.",
        ),
        tonic::Code::PermissionDenied => {
            text.push_str("\nThe token lacks the scope this command needs.");
        }
        _ => {}
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_token_wins_over_the_dev_token_file() {
        let dir = std::env::temp_dir().join(format!("clientele-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dev-token"), "dev-file\n").unwrap();
        assert_eq!(resolve_token(Some(" given "), &dir).unwrap(), "given");
        assert_eq!(resolve_token(None, &dir).unwrap(), "dev-file");
        assert_eq!(resolve_token(Some("  "), &dir).unwrap(), "dev-file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_token_explains_how_to_get_one() {
        let err = resolve_token(None, Path::new("/nonexistent/clientele-data")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--token"), "{text}");
        assert!(text.contains("CLIENTELE_TOKEN"), "{text}");
        assert!(text.contains("dev-token"), "{text}");
    }

    #[test]
    fn statuses_are_described_by_code_name_and_message() {
        let s = tonic::Status::not_found("profile x not found");
        assert_eq!(
            describe_status(&s, "http://h:1"),
            "NOT_FOUND: profile x not found"
        );
    }

    #[test]
    fn connection_failures_name_the_endpoint_and_how_to_start_the_server() {
        let s = tonic::Status::unavailable("tcp connect error");
        let text = describe_status(&s, "http://127.0.0.1:1");
        assert!(text.contains("http://127.0.0.1:1"), "{text}");
        assert!(text.contains("make run"), "{text}");
    }
}
