//! The compiled plan `hotroll check` prints. Placeholder until the plan compiler lands.
