//! The CLI's configuration file (`admin.yaml`, `~/.config/bulkhead/config.yaml`): the controller
//! URL, the CA certificate and the administrator's credential.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::client::{ApiError, Client};
use crate::tls::{Identity, Trust};

/// A CLI configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CliConfig {
    /// The controller, `https://HOST:PORT`.
    pub url: String,
    /// The CA certificate, PEM.
    pub ca: String,
    /// The administrator's client certificate, PEM.
    pub certificate: String,
    /// Its private key, PEM. Keep this file mode 0600.
    pub key: String,
}

impl CliConfig {
    /// Reads a configuration; the error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<CliConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes the configuration with mode 0600, replacing any file there atomically.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_saphyr::to_string(self).map_err(|e| e.to_string())?;
        crate::private::write_file(path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// A client for this configuration.
    pub fn client(&self) -> Result<Client, ApiError> {
        Client::new(
            std::slice::from_ref(&self.url),
            &Trust::Ca(self.ca.clone()),
            Some(&Identity {
                cert_pem: self.certificate.clone(),
                key_pem: self.key.clone(),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let c = CliConfig {
            url: "https://127.0.0.1:7443".into(),
            ca: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            certificate: "x\ny\n".into(),
            key: "k\n".into(),
        };
        let p = std::env::temp_dir().join(format!("bh-cli-config-{}.yaml", std::process::id()));
        c.save(&p).unwrap();
        assert_eq!(CliConfig::load(&p).unwrap(), c);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&p, "url: [").unwrap();
        assert!(
            CliConfig::load(&p)
                .unwrap_err()
                .contains(&p.display().to_string())
        );
        std::fs::remove_file(&p).unwrap();
    }
}
