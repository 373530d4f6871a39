//! The service's identity names its variables, runtime directory and journal fields: once
//! something read it, another one cannot be set silently.

use baton_lifecycle::{env, Error, Options};

#[test]
fn an_identity_read_before_start_is_an_error_not_a_silent_baton() {
    // Reading it first (as a stray `Var` name or a control client would) fixes the default.
    assert_eq!(env::identity().name, "baton");
    let options = Options::new("other", "1.0");
    // SAFETY: start_with returns before it changes anything when the identity conflicts, so
    // the test harness's threads are no concern.
    let started = unsafe { baton_lifecycle::start(options) };
    match started {
        Err(Error::Environment(message)) => assert!(
            message.contains("\"baton\"") && message.contains("\"other\""),
            "{message}"
        ),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("started under a second identity"),
    }
}
