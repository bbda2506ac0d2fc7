//! Every engine this build has, through the trait: reads, ordered prefix scans, atomic
//! batches, and what a reopen finds after a commit.

use metakv::{collect_prefix, open, Batch, Engine};

fn engines() -> Vec<Engine> {
    Engine::ALL.into_iter().filter(|e| e.is_built()).collect()
}

#[test]
fn batches_scans_and_reopen() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        {
            let kv = open(engine, &path).unwrap();
            assert_eq!(kv.engine(), engine);
            let mut b = Batch::default();
            for i in (0u32..300).rev() {
                b.put(&[b"n".as_slice(), &i.to_be_bytes()].concat(), &i.to_le_bytes());
            }
            b.put(b"m:x", b"1");
            b.put(b"o", b"other");
            kv.apply(&b).unwrap();
            let mut b = Batch::default();
            b.delete(&[b"n".as_slice(), &7u32.to_be_bytes()].concat());
            b.put(b"m:x", b"2");
            b.put(b"m:x", b"3");
            kv.apply(&b).unwrap();
            assert_eq!(kv.get(b"m:x").unwrap().as_deref(), Some(b"3".as_slice()), "{engine}: last put wins");
            kv.commit().unwrap();
        }
        let kv = open(engine, &path).unwrap();
        let n = collect_prefix(kv.as_ref(), b"n").unwrap();
        assert_eq!(n.len(), 299, "{engine}: one deleted");
        let keys: Vec<u32> = n.iter().map(|(k, _)| u32::from_be_bytes(k[1..].try_into().unwrap())).collect();
        let want: Vec<u32> = (0..300).filter(|&i| i != 7).collect();
        assert_eq!(keys, want, "{engine}: scans come in key order");
        assert!(n.iter().all(|(k, v)| k[1..] == v.iter().rev().copied().collect::<Vec<_>>()[..]));
        assert_eq!(kv.get(b"m:x").unwrap().as_deref(), Some(b"3".as_slice()));
        assert_eq!(kv.get(b"missing").unwrap(), None);
        assert_eq!(collect_prefix(kv.as_ref(), b"").unwrap().len(), 301, "{engine}: an empty prefix is everything");
        kv.reclaim().unwrap();
    }
}

#[test]
fn large_values_and_many_batches() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        {
            let kv = open(engine, &path).unwrap();
            for round in 0u64..50 {
                let mut b = Batch::default();
                for i in 0u64..200 {
                    b.put(&(round * 200 + i).to_be_bytes(), &vec![round as u8; 2048]);
                }
                kv.apply(&b).unwrap();
                if round % 10 == 9 {
                    kv.commit().unwrap();
                }
            }
        }
        let kv = open(engine, &path).unwrap();
        let all = collect_prefix(kv.as_ref(), b"").unwrap();
        assert_eq!(all.len(), 10_000, "{engine}");
        assert!(all
            .iter()
            .all(|(k, v)| v.len() == 2048 && u64::from_be_bytes(k[..].try_into().unwrap()) / 200 == u64::from(v[0])));
    }
}
