//! The object store, opened from a URL: `file:///path` (fsync'd, the embedded default),
//! `s3://bucket/prefix` (any S3-compatible endpoint, configured by the standard `AWS_*`
//! environment variables) and `memory://` (unit tests).
use std::sync::Arc;

use anyhow::{Context, bail};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// A handle on the bucket (or directory) where segments live. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

impl Store {
    /// Opens the store a URL names. A bare path is taken as a local directory.
    pub fn open(url: &str) -> anyhow::Result<Self> {
        Self::open_with(url, &[])
    }

    /// Like [`Store::open`], with `AWS_*` settings given explicitly (they override the
    /// environment's).
    pub fn open_with(url: &str, aws: &[(String, String)]) -> anyhow::Result<Self> {
        let inner: Arc<dyn ObjectStore> = if url == "memory://" || url == "memory:" {
            Arc::new(InMemory::new())
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("store URL {url:?} names no bucket");
            }
            let mut b = AmazonS3Builder::from_env();
            for (k, v) in aws {
                let key = k
                    .to_ascii_lowercase()
                    .parse()
                    .with_context(|| format!("unknown S3 setting {k}"))?;
                b = b.with_config(key, v);
            }
            let s3 = b
                .with_bucket_name(bucket)
                .with_virtual_hosted_style_request(false)
                .build()
                .with_context(|| format!("configuring S3 store {url}"))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            }
        } else {
            let path = url.strip_prefix("file://").unwrap_or(url);
            if path.is_empty() || url.contains("://") && !url.starts_with("file://") {
                bail!(
                    "unsupported store URL {url:?}: use file:///path, s3://bucket/prefix or memory://"
                );
            }
            std::fs::create_dir_all(path)
                .with_context(|| format!("creating store directory {path}"))?;
            let fs = LocalFileSystem::new_with_prefix(path)
                .with_context(|| format!("opening store directory {path}"))?
                .with_fsync(true);
            Arc::new(fs)
        };
        Ok(Self {
            inner,
            url: url.to_owned(),
        })
    }

    /// The URL this store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Writes one object; returns once it is durable (the store's own guarantee: S3 PUT, or
    /// file + directory fsync for the local store).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> object_store::Result<()> {
        self.inner
            .put(&Path::from(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> object_store::Result<bytes::Bytes> {
        self.inner.get(&Path::from(key)).await?.bytes().await
    }

    /// Reads a byte range of an object.
    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> object_store::Result<bytes::Bytes> {
        self.inner.get_range(&Path::from(key), range).await
    }

    /// Lists keys under a prefix (recursively), sorted.
    pub async fn list(&self, prefix: &str) -> object_store::Result<Vec<String>> {
        use futures::TryStreamExt;
        let p = Path::from(prefix);
        let mut keys: Vec<String> = self
            .inner
            .list(Some(&p))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await?;
        keys.sort();
        Ok(keys)
    }
}
