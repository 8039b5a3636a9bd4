"""gRPC servicers: translate requests into domain calls and answers back."""
