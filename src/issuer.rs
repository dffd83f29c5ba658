//! The issuer URL: validated once, then used verbatim in every token and document. Discovery and
//! JWKS locations hang off it with exactly one slash, whether or not it ends in `/`.

use std::fmt;

/// A validated issuer URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuer {
    url: String,
    /// The URL's path without a trailing slash (`""` for a bare host).
    base_path: String,
}

/// Path of the discovery document under the issuer.
pub const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";
/// Path of the JWKS under the issuer (as Kubernetes and AKS serve it).
pub const JWKS_SUFFIX: &str = "/openid/v1/jwks";

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

impl Issuer {
    /// Checks an issuer URL: `https`, or `http` only on a loopback host; a host; no query, no
    /// fragment, no user info. The text is kept byte for byte.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.contains('#') {
            return Err(format!(
                "issuer {text:?} has a fragment; an issuer URL may not"
            ));
        }
        if text.contains('?') {
            return Err(format!(
                "issuer {text:?} has a query; an issuer URL may not"
            ));
        }
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("issuer {text:?} is not a URL: {e}"))?;
        let scheme = uri.scheme_str().unwrap_or("");
        let authority = uri.authority().ok_or_else(|| {
            format!("issuer {text:?} must be an absolute URL such as https://issuer.example/")
        })?;
        if authority.as_str().contains('@') {
            return Err(format!("issuer {text:?} may not carry user information"));
        }
        match scheme {
            "https" => {}
            "http" if is_loopback(authority.host()) => {}
            "http" => {
                return Err(format!(
                    "issuer {text:?} uses http on a non-loopback host; relying parties require https"
                ));
            }
            other => return Err(format!("issuer {text:?} has scheme {other:?}; use https")),
        }
        // Clients normalise dot segments and may collapse empty ones before they fetch, so such
        // a path would name documents at a different place from where the gateway serves them.
        let path = uri.path().trim_end_matches('/');
        if path
            .split('/')
            .skip(1)
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(format!(
                "issuer {text:?} has an empty, \".\" or \"..\" path segment; write the path \
                 out plainly, e.g. https://issuer.example/tenant/a"
            ));
        }
        Ok(Issuer {
            url: text.to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The issuer, verbatim.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    fn join(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.url.trim_end_matches('/'))
    }

    /// `{issuer}/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        self.join(DISCOVERY_SUFFIX)
    }

    /// `{issuer}/openid/v1/jwks`.
    pub fn jwks_url(&self) -> String {
        self.join(JWKS_SUFFIX)
    }

    /// The request path of the discovery document.
    pub fn discovery_path(&self) -> String {
        format!("{}{DISCOVERY_SUFFIX}", self.base_path)
    }

    /// The request path of the JWKS.
    pub fn jwks_path(&self) -> String {
        format!("{}{JWKS_SUFFIX}", self.base_path)
    }
}

impl fmt::Display for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slash_whether_or_not_the_issuer_ends_in_one() {
        for text in [
            "https://issuer.example/tenant",
            "https://issuer.example/tenant/",
        ] {
            let i = Issuer::parse(text).unwrap();
            assert_eq!(i.as_str(), text);
            assert_eq!(i.jwks_url(), "https://issuer.example/tenant/openid/v1/jwks");
            assert_eq!(
                i.discovery_path(),
                "/tenant/.well-known/openid-configuration"
            );
        }
        let bare = Issuer::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(bare.jwks_path(), "/openid/v1/jwks");
        assert_eq!(
            bare.discovery_url(),
            "http://127.0.0.1:8080/.well-known/openid-configuration"
        );
    }

    #[test]
    fn http_only_on_loopback() {
        assert!(Issuer::parse("http://localhost:8080").is_ok());
        assert!(Issuer::parse("http://[::1]:8080/").is_ok());
        assert!(Issuer::parse("http://127.0.0.2/").is_ok());
        let err = Issuer::parse("http://issuer.example/").unwrap_err();
        assert!(err.contains("https"), "{err}");
    }

    #[test]
    fn refuses_query_fragment_userinfo_and_odd_schemes() {
        for bad in [
            "https://i.example/?a=b",
            "https://i.example/#x",
            "https://user@i.example/",
            "ftp://i.example/",
            "/relative",
            "",
            "https://i.example/x/../y",
            "https://i.example/./y",
            "https://i.example/a//b",
        ] {
            assert!(Issuer::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Issuer::parse("https://i.example/a.b/..c/").is_ok(),
            "dots inside names"
        );
    }
}
