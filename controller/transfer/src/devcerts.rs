//! Development certificates: a throw-away CA and node certificates signed by it, for trying
//! the transfer out, for tests and for benchmarks. A cluster uses certificates from its own CA
//! (cert-manager or similar), mounted from Secrets.
//!
//! Every node certificate is usable for both TLS roles (server and client authentication),
//! because every agent both sends and receives. Keys are ECDSA P-256. Validity starts a day in
//! the past (clock skew between nodes) and lasts `valid_days`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    /// rcgen refused the parameters (for instance an invalid DNS name).
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("writing `{path}`: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// A node name was empty or could not be used as a file name.
    #[error("node name `{0}` must be non-empty and contain only letters, digits, `-`, `_`, `.`")]
    BadNodeName(String),
}

/// A CA that can sign node certificates.
pub struct DevCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

/// A node's certificate and key, as PEM.
#[derive(Clone)]
pub struct NodeCert {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new CA named `name`.
    pub fn generate(name: &str, valid_days: u32) -> Result<Self, DevCertError> {
        let what = || format!("CA `{name}`");
        let key = KeyPair::generate().map_err(|source| DevCertError::Generate {
            what: what(),
            source,
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = named(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, valid_days);
        let cert = params
            .self_signed(&key)
            .map_err(|source| DevCertError::Generate {
                what: what(),
                source,
            })?;
        Ok(Self {
            pem: cert.pem(),
            params,
            key,
        })
    }

    /// The CA certificate (PEM), the trust bundle every node gets.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for node `name`, valid for the DNS names and IP addresses in `sans`
    /// (strings; IPs are recognised). The node name itself is always included.
    pub fn node(
        &self,
        name: &str,
        sans: &[String],
        valid_days: u32,
    ) -> Result<NodeCert, DevCertError> {
        let what = || format!("certificate for node `{name}`");
        let mut names = vec![name.to_owned()];
        names.extend(sans.iter().filter(|san| *san != name).cloned());
        let mut params =
            CertificateParams::new(names).map_err(|source| DevCertError::Generate {
                what: what(),
                source,
            })?;
        params.distinguished_name = named(name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, valid_days);
        let key = KeyPair::generate().map_err(|source| DevCertError::Generate {
            what: what(),
            source,
        })?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| DevCertError::Generate {
                what: what(),
                source,
            })?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Files written by [`write_dev_pki`].
#[derive(Debug, Clone)]
pub struct DevPkiFiles {
    /// `ca.pem`
    pub ca: PathBuf,
    /// Per node: (name, `<name>.pem`, `<name>-key.pem`).
    pub nodes: Vec<(String, PathBuf, PathBuf)>,
}

/// Writes `ca.pem` and, per node, `<node>.pem` and `<node>-key.pem` (mode 0600) into `dir`.
/// Each node's certificate is valid for its name, `localhost`, `127.0.0.1`, `::1` and `sans`.
pub fn write_dev_pki(
    dir: &Path,
    nodes: &[String],
    sans: &[String],
    valid_days: u32,
) -> Result<DevPkiFiles, DevCertError> {
    std::fs::create_dir_all(dir).map_err(|source| DevCertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca = DevCa::generate("automigrate dev CA", valid_days)?;
    let ca_path = dir.join("ca.pem");
    write_file(&ca_path, ca.cert_pem(), 0o644)?;
    let mut written = Vec::new();
    for node in nodes {
        let valid = !node.is_empty()
            && node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !node.starts_with('.');
        if !valid {
            return Err(DevCertError::BadNodeName(node.clone()));
        }
        let mut all_sans: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        all_sans.extend(sans.iter().cloned());
        let cert = ca.node(node, &all_sans, valid_days)?;
        let cert_path = dir.join(format!("{node}.pem"));
        let key_path = dir.join(format!("{node}-key.pem"));
        write_file(&cert_path, &cert.cert_pem, 0o644)?;
        write_file(&key_path, &cert.key_pem, 0o600)?;
        written.push((node.clone(), cert_path, key_path));
    }
    Ok(DevPkiFiles {
        ca: ca_path,
        nodes: written,
    })
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), DevCertError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let error = |source| DevCertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)
}

fn named(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "automigrate (development)");
    dn
}

fn set_validity(params: &mut CertificateParams, valid_days: u32) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let today = i64::try_from(now.as_secs() / 86_400).unwrap_or(0);
    let (year, month, day) = civil(today - 1);
    params.not_before = rcgen::date_time_ymd(year, month, day);
    let (year, month, day) = civil(today + i64::from(valid_days.max(1)));
    params.not_after = rcgen::date_time_ymd(year, month, day);
}

/// A civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`), so no date
/// library is needed for two timestamps.
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        i32::try_from(year).unwrap_or(2000),
        u8::try_from(month).unwrap_or(1),
        u8::try_from(day).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_454), (2026, 1, 1));
        assert_eq!(civil(-1), (1969, 12, 31));
    }

    #[test]
    fn node_certificates_load_as_tls_configs() {
        let ca = DevCa::generate("test CA", 2).unwrap();
        let node = ca.node("node-a", &["127.0.0.1".into()], 2).unwrap();
        crate::tls::TlsConfig::from_pem(
            ca.cert_pem().as_bytes(),
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
        )
        .unwrap();
    }
}
