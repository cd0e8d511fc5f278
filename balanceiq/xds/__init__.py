"""xDS: the weight store (snapshots, versions, persistence) and the gRPC servicers; layered
assignment -> snapshot -> store -> protocol -> server -> actor."""
