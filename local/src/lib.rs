//! An in-process hotroll fleet: the real coordinator and N real agents on 127.0.0.1 (not yet: see the builder to come).
