//! TLS configuration: the certificates of the listeners `[tls.NAME]` names, read and checked
//! afresh by each generation, into a rustls [`ServerConfig`] each (TLS 1.2 and 1.3 with the ring
//! provider, ALPN `h2` then `http/1.1`, session tickets, a certificate chosen by SNI).
//!
//! ```toml
//! [tls.https]                              # the listener named https speaks TLS
//! cert = "/etc/ssl/certs/example.pem"      # PEM chain, leaf first
//! key = "credential:example.key"           # or an absolute path; credential:NAME is
//!                                          # $CREDENTIALS_DIRECTORY/NAME (LoadCredential=)
//! min_version = "1.2"                      # or "1.3"
//! sni = [{ cert = "/etc/ssl/certs/other.pem", key = "/etc/ssl/private/other.key" }]
//! ```
//!
//! A certificate is refused, with one line naming the file, when it cannot be read, holds no
//! PEM certificate or key, does not match its key, or is expired or not valid yet: `baton
//! check` says so, and a reload with it fails while the running generation goes on serving.
//! Because a new generation reads the files anew, `systemctl reload baton` (certbot's deploy
//! hook) serves a renewed certificate without dropping a connection.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// Where a certificate or key is: a file, or a systemd credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// `credential:NAME`: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

impl std::str::FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Source, String> {
        if let Some(name) = s.strip_prefix("credential:") {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(format!(
                    "'{s}' names no credential: write credential:NAME, NAME as in \
                     LoadCredential=NAME:PATH"
                ));
            }
            return Ok(Source::Credential(name.to_owned()));
        }
        let path = Path::new(s);
        if !path.is_absolute() {
            return Err(format!(
                "'{s}' is not an absolute path: write /path/to/file.pem, or credential:NAME"
            ));
        }
        Ok(Source::File(path.to_owned()))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Credential(name) => write!(f, "credential:{name}"),
        }
    }
}

impl Source {
    /// The file to read.
    pub fn path(&self) -> Result<PathBuf, String> {
        match self {
            Source::File(path) => Ok(path.clone()),
            Source::Credential(name) => match std::env::var_os("CREDENTIALS_DIRECTORY") {
                Some(dir) => Ok(Path::new(&dir).join(name)),
                None => Err(format!(
                    "credential:{name} needs $CREDENTIALS_DIRECTORY, which systemd sets for a \
                     unit with LoadCredential={name}:PATH; without systemd, give an absolute path"
                )),
            },
        }
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

impl std::str::FromStr for MinVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<MinVersion, String> {
        match s {
            "1.2" => Ok(MinVersion::Tls12),
            "1.3" => Ok(MinVersion::Tls13),
            _ => Err(format!(
                "'{s}' is not a TLS version baton speaks: use \"1.2\" or \"1.3\""
            )),
        }
    }
}

/// A certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: Source,
    pub key: Source,
}

/// The TLS settings of one listener (`[tls.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Served when the client names no host, or one no SNI certificate has.
    pub default: Pair,
    pub min_version: MinVersion,
    /// More certificates, chosen by the host name the client asks for.
    pub sni: Vec<Pair>,
}

/// A certificate loaded and checked, with the DNS names it is for.
struct Loaded {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
}

/// Why a listener's TLS cannot be set up: one line, naming the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the certificate and key of `pair` (`at`: the configuration key, for the
/// message), valid at `now`.
fn load(
    pair: &Pair,
    at: &str,
    now: SystemTime,
    provider: &CryptoProvider,
) -> Result<Loaded, TlsError> {
    let fail = |source: &Source, what: String| TlsError(format!("{at}: {source}: {what}"));
    let cert_path = pair
        .cert
        .path()
        .map_err(|e| TlsError(format!("{at}: {e}")))?;
    let key_path = pair
        .key
        .path()
        .map_err(|e| TlsError(format!("{at}: {e}")))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| fail(&pair.cert, pem_problem(e, "certificate")))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(&pair.cert, pem_problem(e, "certificate")))?;
    let Some(leaf) = chain.first() else {
        return Err(fail(
            &pair.cert,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the chain, leaf first"
                .to_owned(),
        ));
    };
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| fail(&pair.key, pem_problem(e, "private key")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        fail(
            &pair.cert,
            format!("its first certificate does not parse: {e}"),
        )
    })?;
    let validity = parsed.validity();
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now_secs > validity.not_after.timestamp() {
        return Err(fail(
            &pair.cert,
            format!(
                "expired on {}; renew it (certbot renew) and reload",
                validity.not_after
            ),
        ));
    }
    if now_secs < validity.not_before.timestamp() {
        return Err(fail(
            &pair.cert,
            format!(
                "not valid before {}; check the clock or the certificate",
                validity.not_before
            ),
        ));
    }
    let names = dns_names(&parsed);
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        // systemd before 259 loads LoadCredential= files when the service starts only: a
        // reload sees the key of then.
        let why = match &pair.key {
            Source::Credential(_) => {
                "; a credential is the file as it was when the service started: load a new key \
                 with systemctl restart (clients wait in the socket's backlog), or renew with the \
                 same key (certbot --reuse-key)"
            }
            Source::File(_) => "; give the key of this certificate",
        };
        TlsError(format!(
            "{at}: {} does not go with {} ({e}){why}",
            pair.key, pair.cert
        ))
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        names,
    })
}

/// The DNS names of a certificate's subject alternative names, lowercase.
fn dns_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn pem_problem(e: rustls_pki_types::pem::Error, what: &str) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("cannot read it: {e}"),
        Error::NoItemsFound => format!("holds no PEM {what}"),
        e => format!("is not PEM: {e}"),
    }
}

/// Picks the certificate for the host name a client asks for (SNI): an SNI certificate with
/// that name (or a `*.` wildcard over one label of it), else the default one.
#[derive(Debug)]
struct BySni {
    default: Arc<CertifiedKey>,
    sni: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|host| {
            let host = host.to_ascii_lowercase();
            self.sni
                .iter()
                .find(|(names, _)| names.iter().any(|name| name_matches(name, &host)))
                .map(|(_, key)| key.clone())
        });
        Some(chosen.unwrap_or_else(|| self.default.clone()))
    }
}

/// Whether a certificate's DNS name covers `host` (exact, or `*.example.com` for one label).
fn name_matches(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(domain) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == domain),
        None => name == host,
    }
}

/// The rustls configuration of one listener, its files read now.
pub fn server_config(name: &str, listener: &Listener) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let now = SystemTime::now();
    let default = load(&listener.default, &format!("tls.{name}"), now, &provider)?;
    let mut sni = Vec::new();
    for (i, pair) in listener.sni.iter().enumerate() {
        let at = format!("tls.{name}.sni[{i}]");
        let loaded = load(pair, &at, now, &provider)?;
        if loaded.names.is_empty() {
            return Err(TlsError(format!(
                "{at}: {}: has no DNS name (subjectAltName) to be chosen by; give a \
                 certificate for the host names it serves",
                pair.cert
            )));
        }
        sni.push((loaded.names, loaded.key));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match listener.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsError(format!("tls.{name}: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni {
            default: default.key,
            sni,
        }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| TlsError(format!("tls.{name}: cannot make session tickets: {e}")))?;
    Ok(Arc::new(config))
}

/// The rustls configuration of every TLS listener of `config`, by listener name.
pub fn server_configs(config: &Config) -> Result<HashMap<String, Arc<ServerConfig>>, TlsError> {
    config
        .tls
        .iter()
        .map(|(name, listener)| Ok((name.clone(), server_config(name, listener)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("example.com", "example.com"));
        assert!(name_matches("*.example.com", "www.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }

    #[test]
    fn sources_and_versions_parse_with_advice() {
        assert_eq!(
            "credential:site.key".parse::<Source>(),
            Ok(Source::Credential("site.key".into()))
        );
        for bad in ["credential:", "credential:a/b", "relative.pem"] {
            assert!(bad.parse::<Source>().is_err(), "{bad}");
        }
        assert!("1.1"
            .parse::<MinVersion>()
            .unwrap_err()
            .contains("\"1.2\" or \"1.3\""));
    }
}
