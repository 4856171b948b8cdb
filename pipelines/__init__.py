"""KFP pipelines: composition only (installed as ``kubellm.pipelines``)."""
