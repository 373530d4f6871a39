//! Where the `/-/` endpoints answer (`[admin]` of the configuration).
//!
//! Each listener gets a [`Role`] when the server starts accepting, from its name and the names
//! of the others ([`Admin::role`]):
//!
//! | `[admin]`                                    | listener                 | answers                                              |
//! |----------------------------------------------|--------------------------|------------------------------------------------------|
//! | `endpoints = false`                          | every one                | files only: the root's `/-/` paths are files          |
//! | no listener named `listener` (the default)   | every one                | the endpoints, and files for every other path         |
//! | a listener named `listener` exists           | that one                 | the endpoints only; anything else is 404              |
//! |                                              | the others               | the endpoints of `public`, files for every other path |
//!
//! `public` defaults to `["/-/healthy"]`, so the health check stays reachable on the main
//! listener when the version and the metrics move to an admin listener. The admin listener
//! serves no file of the root: it is meant for operators and scrapers, and a root's `/-/` file
//! is not shadowed by it either.

use crate::config::ENDPOINTS;

/// What one listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The endpoints and the files (no admin listener: as before the setting existed).
    All,
    /// The public endpoints (`admin.public`) and the files: a web listener beside the admin one.
    Web,
    /// The endpoints and nothing else.
    Admin,
    /// Files only (`admin.endpoints = false`).
    Files,
}

/// The `[admin]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Whether the endpoints answer anywhere.
    pub endpoints: bool,
    /// The listener that takes them, if one has this name.
    pub listener: String,
    /// Endpoints answered on [`Role::Web`] listeners as well.
    pub public: Vec<String>,
}

impl Default for Admin {
    /// As [`crate::config::Config::default`].
    fn default() -> Admin {
        Admin {
            endpoints: true,
            listener: "admin".to_owned(),
            public: vec![ENDPOINTS[0].to_owned()],
        }
    }
}

impl Admin {
    /// The role of the listener `name` among the listeners `all` (its own name included).
    pub fn role<'a>(&self, name: &str, mut all: impl Iterator<Item = &'a str>) -> Role {
        if !self.endpoints {
            Role::Files
        } else if name == self.listener {
            Role::Admin
        } else if all.any(|n| n == self.listener) {
            Role::Web
        } else {
            Role::All
        }
    }

    /// Whether `path` is an endpoint that answers on a listener of `role`.
    pub fn answers(&self, role: Role, path: &str) -> bool {
        match role {
            Role::Files => false,
            Role::All | Role::Admin => ENDPOINTS.contains(&path),
            Role::Web => ENDPOINTS.contains(&path) && self.public.iter().any(|p| p == path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_what_they_answer() {
        let admin = Admin::default();
        let names = ["http", "admin"];
        assert_eq!(admin.role("http", ["http"].into_iter()), Role::All);
        assert_eq!(admin.role("http", names.into_iter()), Role::Web);
        assert_eq!(admin.role("admin", names.into_iter()), Role::Admin);
        let off = Admin {
            endpoints: false,
            ..Admin::default()
        };
        assert_eq!(off.role("admin", names.into_iter()), Role::Files);
        for path in ENDPOINTS {
            assert!(admin.answers(Role::All, path));
            assert!(admin.answers(Role::Admin, path));
            assert!(!admin.answers(Role::Files, path));
            assert_eq!(admin.answers(Role::Web, path), path == "/-/healthy");
        }
        assert!(!admin.answers(Role::All, "/-/other"));
        assert!(!admin.answers(Role::Admin, "/index.html"));
    }
}
