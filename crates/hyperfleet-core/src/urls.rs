//! How the proxy's public URLs look: `<scheme>://<port>-<machine id>.<suffix>[:<proxy port>]/`.
//!
//! The machine JSON lists one per exposed port (`urls`, rendered by the
//! store's record cache), and the proxy's host-name routing parses the same
//! shape back (`proxy::route`). It lives outside both so that neither the
//! store nor the API depends on the proxy.

/// The parts of a proxy URL that come from the server's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    /// `http` or `https` (when a TLS terminator sits in front of the proxy).
    pub scheme: String,
    /// The domain under which machines are named, e.g. `localhost` or
    /// `machines.example.com`.
    pub suffix: String,
    /// The port clients connect to; left out of URLs when it is the
    /// scheme's default.
    pub port: u16,
}

impl UrlTemplate {
    /// The URL of guest port `port` of machine `id`.
    pub fn url(&self, port: u32, id: &str) -> String {
        let default_port = matches!(
            (self.scheme.as_str(), self.port),
            ("http", 80) | ("https", 443)
        );
        if default_port {
            format!("{}://{port}-{id}.{}/", self.scheme, self.suffix)
        } else {
            format!(
                "{}://{port}-{id}.{}:{}/",
                self.scheme, self.suffix, self.port
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_leave_out_default_ports() {
        let mut t = UrlTemplate {
            scheme: "http".into(),
            suffix: "localhost".into(),
            port: 4000,
        };
        assert_eq!(t.url(8080, "mabc"), "http://8080-mabc.localhost:4000/");
        t.port = 80;
        assert_eq!(t.url(8080, "mabc"), "http://8080-mabc.localhost/");
        t.scheme = "https".into();
        t.port = 443;
        assert_eq!(t.url(3000, "m1"), "https://3000-m1.localhost/");
    }
}
